"""What the factory hands to other systems: DHCP reservations (OPNsense, Kea, dnsmasq) and OpenTofu."""
