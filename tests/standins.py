"""Stand-ins for macOS's programs (launchctl, security, plutil, uname) and for uv's tool verbs.

Each logs its arguments to `$FAKE_STATE/calls`, one call per line, and behaves as the real one
does, on state kept in `$FAKE_STATE`:
- launchctl loads the plist the script wrote and, as launchd does, starts its ProgramArguments
  with its EnvironmentVariables only, its WorkingDirectory, its log files and its open-files
  limit, and counts the starts since the load (`print`'s `runs`); bootout stops it with SIGTERM
  (SIGKILL after 20 s, launchd's ExitTimeOut).
- security keeps a keychain: certificates by SHA-1, and per-user trust settings, "trusted" or
  "never" (the user chose Never Trust); `verify-cert` answers with the trust decision.
- uv's tool verbs link the tool the test session built once (the real `uv tool install` is the
  slow part); a proxy variable in its environment fails them, as claude-proxy would refuse the
  package index.
A test queues exit codes for a verb (`launchctl-bootout` holding "36\\n0": the first bootout
answers 36 and does nothing, the next one does its work and answers 0).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import plistlib
import resource
import select
import signal
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_STATE", "."))
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                   "all_proxy")  # fmt: skip
EXIT_TIMEOUT = 20.0  # launchd's ExitTimeOut


def main(name: str) -> int:
    args = sys.argv[1:]
    with open(STATE / "calls", "a") as calls:
        calls.write(" ".join([name, *args]) + "\n")
    queued = next_code(f"{name}-{args[0] if args else ''}")
    if queued:  # a failure the test asked for: nothing happens
        print(f"{name}: failed ({queued})", file=sys.stderr)
        return queued
    program = {
        "uname": uname,
        "plutil": plutil,
        "launchctl": launchctl,
        "security": security,
        "uv": uv,
    }[name]
    return program(args)


def next_code(key: str) -> int:
    path = STATE / key
    if not path.exists():
        return 0
    codes = path.read_text().split()
    if not codes:
        return 0
    path.write_text("".join(f"{c}\n" for c in codes[1:]))
    return int(codes[0])


def load(name: str, default: object) -> object:
    path = STATE / name
    return json.loads(path.read_text()) if path.exists() else default


def save(name: str, value: object) -> None:
    (STATE / f"{name}.new").write_text(json.dumps(value))
    (STATE / f"{name}.new").replace(STATE / name)


def uname(args: list[str]) -> int:
    path = STATE / "uname"
    print(path.read_text().strip() if path.exists() else "Darwin")
    return 0


def plutil(args: list[str]) -> int:
    try:
        plistlib.loads(Path(args[-1]).read_bytes())
    except (OSError, plistlib.InvalidFileException) as e:
        print(f"{args[-1]}: {e}")
        return 1
    print(f"{args[-1]}: OK")
    return 0


# launchctl


def launchctl(args: list[str]) -> int:
    verb, rest = args[0], args[1:]
    agent = load("launchd.json", {})
    assert isinstance(agent, dict)
    if verb == "enable":
        return 0
    if verb == "bootstrap":
        if agent.get("plist"):
            print("Bootstrap failed: 5: Input/output error", file=sys.stderr)
            return 5
        plist = rest[1]
        agent = {"plist": plist, "label": plistlib.loads(Path(plist).read_bytes())["Label"]}
        save("launchd.json", agent)
        if plistlib.loads(Path(plist).read_bytes()).get("RunAtLoad"):
            start(agent)
        return 0
    if not agent.get("plist") or not rest or not rest[-1].endswith("/" + agent["label"]):
        print(f"{verb}: 113: Could not find specified service", file=sys.stderr)
        return 113
    if verb == "bootout":
        stop(agent)
        save("launchd.json", {})
        return 0
    if verb == "kickstart":
        if "-k" in rest:
            stop(agent)
        if not running(agent):
            start(agent)
        return 0
    if verb == "print":
        state = "running" if running(agent) else "not running"
        print(f"{agent['label']} = {{\n\tstate = {state}\n\truns = {agent.get('runs', 0)}")
        if running(agent):
            print(f"\tpid = {agent.get('pid')}")
        print("}")
        return 0
    print(f"launchctl stand-in: unknown verb {verb}", file=sys.stderr)
    return 64


def start(agent: dict[str, object]) -> None:
    """Start the program under a small supervisor (launchd's part): it waits for the program."""
    supervisor = subprocess.Popen(
        [sys.executable, __file__, "supervise", str(agent["plist"])],
        env={"FAKE_STATE": str(STATE)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert supervisor.stdout is not None
    answer = supervisor.stdout.readline().strip()  # the program's pid, once it is started
    supervisor.stdout.close()
    agent["supervisor"] = supervisor.pid
    agent["pid"] = int(answer) if answer.isdigit() else None
    runs = agent.get("runs", 0)
    agent["runs"] = (runs if isinstance(runs, int) else 0) + 1  # since the load, as launchd counts
    save("launchd.json", agent)
    with open(STATE / "starts", "a") as starts:
        starts.write(f"{agent['pid']}\n")


def running(agent: dict[str, object]) -> bool:
    pid = agent.get("supervisor")
    return isinstance(pid, int) and not finished(pid, 0)


def finished(pid: int, timeout: float) -> bool:
    """Whether process `pid` has ended, waiting up to `timeout` seconds (it is not our child)."""
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([descriptor], [], [], timeout)[0])
    finally:
        os.close(descriptor)


def stop(agent: dict[str, object]) -> None:
    pid, supervisor = agent.get("pid"), agent.get("supervisor")
    if not isinstance(pid, int) or not isinstance(supervisor, int) or finished(supervisor, 0):
        return
    os.kill(pid, signal.SIGTERM)
    if not finished(supervisor, EXIT_TIMEOUT):
        os.kill(pid, signal.SIGKILL)
        finished(supervisor, EXIT_TIMEOUT)


def supervise(plist: str) -> None:
    document = plistlib.loads(Path(plist).read_bytes())
    out, err = Path(document["StandardOutPath"]), Path(document["StandardErrorPath"])
    if not out.parent.is_dir() or not err.parent.is_dir():
        print("78", flush=True)  # launchd cannot open the log files: EX_CONFIG
        record_exit(None, 78)
        return
    files = document.get("SoftResourceLimits", {}).get("NumberOfFiles")

    def limits() -> None:
        if files:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            soft = files if hard == resource.RLIM_INFINITY else min(files, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        program = subprocess.Popen(
            document["ProgramArguments"],
            env=document.get("EnvironmentVariables", {}),
            cwd=document.get("WorkingDirectory", "/"),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            preexec_fn=limits,
        )
    print(program.pid, flush=True)
    record_exit(program.pid, program.wait())


def record_exit(pid: int | None, code: int) -> None:
    with open(STATE / "exits", "a") as exits:
        exits.write(f"{pid} {code}\n")


# security


def sha1_of(path: str) -> str:
    """The certificate's SHA-1 fingerprint (of its DER bytes), as `security` prints it; without
    cryptography, whose import would double the stand-in's start."""
    pem = Path(path).read_text()
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return hashlib.sha1(base64.b64decode(body)).hexdigest().upper()


def security(args: list[str]) -> int:
    verb, rest = args[0], args[1:]
    keychain = load("keychain.json", {"certs": [], "trust": {}})
    assert isinstance(keychain, dict)
    certs: list[str] = keychain["certs"]
    trust: dict[str, str] = keychain["trust"]
    if verb == "verify-cert":
        sha1 = sha1_of(rest[rest.index("-c") + 1])
        if trust.get(sha1) == "trusted":
            print("...certificate verification successful.")
            return 0
        print("Cert Verify Result: CSSMERR_TP_NOT_TRUSTED")
        return 1
    if verb == "add-trusted-cert":
        sha1 = sha1_of(rest[-1])
        trust[sha1] = "trusted"
        if "-k" in rest and sha1 not in certs:
            certs.append(sha1)
        save("keychain.json", keychain)
        return 0
    if verb == "remove-trusted-cert":
        sha1 = sha1_of(rest[-1])
        if sha1 not in trust:
            print(
                "SecTrustSettingsRemoveTrustSettings: The specified item could not be found in "
                "the keychain.",
                file=sys.stderr,
            )
            return 1
        del trust[sha1]
        save("keychain.json", keychain)
        return 0
    if verb == "trust-settings-export":
        if not trust:
            print(
                "SecTrustSettingsCreateExternalRepresentation: No Trust Settings were found.",
                file=sys.stderr,
            )
            return 1
        document = {"trustList": {sha1: {} for sha1 in trust}, "trustVersion": 1}
        Path(rest[-1]).write_bytes(plistlib.dumps(document))
        return 0
    if verb == "find-certificate":
        for sha1 in certs:
            print(f'SHA-256 hash: {"0" * 64}\nSHA-1 hash: {sha1}\nkeychain: "{rest[-1]}"')
        return 0
    if verb == "delete-certificate":
        sha1 = rest[rest.index("-Z") + 1]
        if sha1 not in certs:
            print('Unable to delete certificate matching "' + sha1 + '"', file=sys.stderr)
            return 44
        certs.remove(sha1)
        save("keychain.json", keychain)
        return 0
    print(f"security stand-in: unknown verb {verb}", file=sys.stderr)
    return 64


# uv's tool verbs

# The one install the scripts make (tests/macos.build_tool builds the session's tool with it).
INSTALL = ["tool", "install", "--reinstall", "--compile-bytecode", "--constraints"]


def uv(args: list[str]) -> int:
    if args[:1] == ["-q"]:
        args = args[1:]
    bin_dir = Path(os.environ["UV_TOOL_BIN_DIR"])
    exe = bin_dir / "claude-proxy"
    built = Path(os.environ["FAKE_BUILT_TOOL"])
    if args[:2] in (["tool", "install"], ["tool", "run"]) and any(
        os.environ.get(v) for v in PROXY_VARIABLES
    ):
        print(
            "error: Request failed after 3 retries: 403 Forbidden (claude-proxy refused "
            "pypi.org: it is not on the allowlist)",
            file=sys.stderr,
        )
        return 2
    if args == ["tool", "dir", "--bin"]:
        print(bin_dir)
        return 0
    if args[:1] == ["export"]:  # uv.lock's versions: the real uv reads the real lock
        os.execv(os.environ["FAKE_REAL_UV"], ["uv", *args])
    if args[: len(INSTALL)] == INSTALL and len(args) == len(INSTALL) + 2:
        pins = Path(args[-2]).read_text()  # the build the session made used the same constraints
        if "\nmitmproxy==" not in "\n" + pins:
            print(f"uv stand-in: no mitmproxy pin in {args[-2]}", file=sys.stderr)
            return 64
        bin_dir.mkdir(parents=True, exist_ok=True)
        exe.unlink(missing_ok=True)
        exe.symlink_to(built)
        return 0
    if args == ["tool", "list"]:
        if exe.is_symlink():
            print("claude-proxy v0.1.0\n- claude-proxy")
        return 0
    if args == ["tool", "uninstall", "claude-proxy"]:
        if not exe.is_symlink():
            print("error: `claude-proxy` is not installed", file=sys.stderr)
            return 2
        exe.unlink()
        return 0
    if args[:3] == ["tool", "run", "--from"] and args[4:5] == ["claude-proxy"]:
        os.execv(built, [str(built), *args[5:]])
    print(f"uv stand-in: not modelled: {args}", file=sys.stderr)
    return 64


if __name__ == "__main__" and sys.argv[1:2] == ["supervise"]:
    supervise(sys.argv[2])
