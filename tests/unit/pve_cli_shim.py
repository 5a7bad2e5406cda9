#!/usr/bin/env python3
"""Stand-in for a PVE node's `pveum`, `pvesm` and `pvesh`: `pve_cli_shim.py PROG ARGS...`.

State: the JSON file $FAKE_PVE_STATE ({"users": [...], "roles": [...], "acl": [...], "storage": {...}}),
read and printed as the real commands print it with `--output-format json`. Every call is appended to
$FAKE_PVE_LOG (one JSON argv per line). With FAKE_PVE_READONLY=1 any write fails (exit 99) so a
check-mode run that tried one would fail; otherwise writes change the state file as PVE would.
Used by tests/unit/test_preflight_playbook.py only.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path


def die(msg: str, code: int = 2) -> None:
    print(msg, file=sys.stderr)
    sys.exit(code)


def opts(args: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        if not args[i].startswith("--") or i + 1 >= len(args):
            die(f"400 unexpected argument {args[i]!r}")
        out[args[i][2:]] = args[i + 1]
        i += 2
    return out


def main() -> None:
    prog = sys.argv[1]
    argv = sys.argv[2:]
    state_file = Path(os.environ["FAKE_PVE_STATE"])
    with open(os.environ["FAKE_PVE_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps([prog, *argv]) + "\n")
    state = json.loads(state_file.read_text())
    words = [a for a in argv if not a.startswith("--")][:3]

    def show(data: object) -> None:
        if argv[-2:] != ["--output-format", "json"]:
            die("the shim only answers --output-format json")
        print(json.dumps(data))

    # ------------------------------------------------------------------ reads
    version = str(state.get("version", "8.4.1"))
    if prog == "pveversion":
        print(f"pve-manager/{version}/ec5affc9e41f1d79 (running kernel: 6.8.12-9-pve)")
        return None
    if prog == "pveum" and argv[:2] == ["user", "list"]:
        users = state["users"] if "--full" in argv else [{k: v for k, v in u.items() if k != "tokens"}
                                                         for u in state["users"]]
        return show(users)
    if prog == "pveum" and argv[:2] == ["role", "list"]:
        return show(state["roles"])
    if prog == "pveum" and argv[:2] == ["acl", "list"]:
        return show(state["acl"])
    if prog == "pvesh" and argv[:1] == ["get"] and argv[1].startswith("/storage/"):
        sid = argv[1].split("/")[2]
        if sid not in state["storage"]:
            die(f"storage '{sid}' does not exist")
        return show(dict(state["storage"][sid], storage=sid))

    # ------------------------------------------------------------------ writes
    if os.environ.get("FAKE_PVE_READONLY") == "1":
        die(f"shim: write refused (read-only run): {prog} {' '.join(argv)}", 99)
    if prog == "pveum" and words[:2] in (["role", "add"], ["role", "modify"]):
        from image_factory.lab.privileges import invalid

        bad = invalid(opts(argv[3:]).get("privs", "").split(","), version)
        if bad:
            die(f"400 Parameter verification failed.\nprivs: invalid privilege '{bad[0]}'")
    if prog == "pveum" and words[:2] == ["role", "add"]:
        o = opts(argv[3:])
        if any(r["roleid"] == argv[2] for r in state["roles"]):
            die(f"role '{argv[2]}' already exists")
        state["roles"].append({"roleid": argv[2], "privs": o.get("privs", ""), "special": 0})
    elif prog == "pveum" and words[:2] == ["role", "modify"]:
        o = opts(argv[3:])
        role = next((r for r in state["roles"] if r["roleid"] == argv[2]), None) or die("role does not exist")
        role["privs"] = o["privs"]  # type: ignore[index]
    elif prog == "pveum" and argv[:2] == ["user", "add"]:
        opts(argv[3:])
        if any(u["userid"] == argv[2] for u in state["users"]):
            die(f"user '{argv[2]}' already exists")
        state["users"].append({"userid": argv[2], "enable": 1, "expire": 0, "tokens": []})
    elif prog == "pveum" and argv[:3] == ["user", "token", "add"]:
        user, name, o = argv[3], argv[4], opts(argv[5:])
        u = next((x for x in state["users"] if x["userid"] == user), None) or die(f"no such user ('{user}')")
        if any(t["tokenid"] == name for t in u["tokens"]):  # type: ignore[index]
            die("Token already exists.")
        u["tokens"].append({"tokenid": name, "privsep": int(o.get("privsep", 1)), "expire": 0})  # type: ignore[index]
        print(json.dumps({"full-tokenid": f"{user}!{name}", "info": {"privsep": int(o.get("privsep", 1))},
                          "value": str(uuid.uuid4())}))
    elif prog == "pveum" and argv[:3] == ["user", "token", "modify"]:
        user, name, o = argv[3], argv[4], opts(argv[5:])
        u = next((x for x in state["users"] if x["userid"] == user), None) or die("no such user")
        t = next((x for x in u["tokens"] if x["tokenid"] == name), None) or die("no such token")  # type: ignore[index]
        t["privsep"] = int(o["privsep"])  # type: ignore[index]
    elif prog == "pveum" and argv[:2] == ["acl", "modify"]:
        path, o = argv[2], opts(argv[3:])
        for kind, key in (("user", "users"), ("token", "tokens")):
            if key in o:
                entry = {"path": path, "roleid": o["roles"], "type": kind, "ugid": o[key], "propagate": 1}
                if entry not in state["acl"]:
                    state["acl"].append(entry)
    elif prog == "pvesm" and argv[:1] == ["set"]:
        sid, o = argv[1], opts(argv[2:])
        if sid not in state["storage"]:
            die(f"storage '{sid}' does not exist")
        state["storage"][sid]["content"] = o["content"]
    else:
        die(f"shim: unknown command {prog} {' '.join(argv)}")
    state_file.write_text(json.dumps(state, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
