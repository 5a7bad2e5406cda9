"""The first-boot hook baked into the install ISO (prepare-iso --on-first-boot; the answer's [first-boot] section
says source "from-iso", ordering "fully-up"): it leaves the host ready for ansible/playbooks/hypervisor.yml.

The installer already gave root the factory's SSH key (root-ssh-keys). What the playbook still needs from the new
host is trust: it pins the host's SSH key (pve.ssh.host_key) and verifies the API certificate (pve.tls_fingerprint
or pve.tls_ca_file), both made fresh by the install. The hook shows them on the console and the login prompt, the
trusted channel an operator at the machine (or its BMC console) reads them from, and checks that the tools the
playbook runs are present. It changes nothing else on the host, and it is the same file for every host.
"""

from __future__ import annotations

FIRST_BOOT_HOOK = """#!/bin/sh
# deevnet-image-factory first-boot hook (proxmox-first-boot, ordering fully-up): show what to pin in the inventory.
# DEEVNET_FIRST_BOOT_ROOT is unset on a host; the factory's tests run the hook under a scratch root.
set -u
root="${DEEVNET_FIRST_BOOT_ROOT:-}"
issue="$root/etc/issue.d/deevnet-image-factory.issue"
cert="$root/etc/pve/local/pve-ssl.pem"
say() {
    printf '%s\\n' "$*" 2>/dev/null >> "$root/dev/console"
    logger -t deevnet-first-boot -- "$*" 2>/dev/null
    printf '%s\\n' "$*"
}
host_key=$(cut -d' ' -f1,2 "$root/etc/ssh/ssh_host_ed25519_key.pub" 2>/dev/null)
api_fp=""
for _ in $(seq 1 60); do
    [ -r "$cert" ] && break
    sleep 2
done
if [ -r "$cert" ]; then
    api_fp=$(openssl x509 -noout -fingerprint -sha256 -in "$cert" | cut -d= -f2)
fi
missing=""
for tool in pveum pvesm pvesh python3; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
mkdir -p "${issue%/*}"
{
    echo "deevnet-image-factory: pin these in the inventory (pve.ssh.host_key, pve.tls_fingerprint):"
    echo "  host_key: ${host_key:-(no ed25519 host key found)}"
    echo "  tls_fingerprint: ${api_fp:-(no API certificate yet: pvenode cert info)}"
    [ -z "$missing" ] || echo "  MISSING for ansible/playbooks/hypervisor.yml:$missing"
} > "$issue"
while IFS= read -r line; do say "$line"; done < "$issue"
[ -n "$host_key" ] && [ -z "$missing" ]
"""
