"""The image wing: render, build and prove an image. It never imports the pve wing."""
