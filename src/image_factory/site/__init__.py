"""The validated site model: inventory, its sources, secrets and the MAC namespace."""
