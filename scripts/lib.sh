# shellcheck shell=bash
# Shared by install-agent.sh and uninstall-agent.sh (sourced, never run). bash 3.2 (macOS's own).
# Every name, path and port comes from `claude-proxy paths`: the CLI computes them, once.

# Set by load_paths from `claude-proxy paths`; declared here so that a typo is an empty value.
# shellcheck disable=SC2034 # used by the scripts that source this file
LABEL="" PLIST="" CONFIG_DIR="" CONFIG_FILE="" CA_CERT="" CA_KEY="" LOG_DIR="" LOG_FILE=""
# shellcheck disable=SC2034
KEYCHAIN=""
# shellcheck disable=SC2034
PORT="" SOCKS_PORT=""
DRY_RUN=0
REPO=""
EXE=""

say() { printf 'claude-proxy: %s\n' "$*" >&2; }
warn() { printf 'claude-proxy: warning: %s\n' "$*" >&2; }

# Run a command that changes something, or only print it with --dry-run.
change() {
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: $*"
    return 0
  fi
  "$@"
}

# Run a command without proxy variables: a shell set up with `claude-proxy env` would send the
# scripts' own network steps (uv's package index) through claude-proxy, which refuses them.
direct() {
  env -u HTTPS_PROXY -u https_proxy -u HTTP_PROXY -u http_proxy -u ALL_PROXY -u all_proxy \
    -u NO_PROXY -u no_proxy "$@"
}

# A port launchd and clients are told: 1-65535 (0 would mean "any free one", which nobody can find).
valid_port() {
  case "$1" in
    '' | *[!0-9]*) return 1 ;;
  esac
  [ "${#1}" -le 5 ] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

# Ask claude-proxy for LABEL, PLIST, CONFIG_DIR, CONFIG_FILE, CA_CERT, CA_KEY, LOG_DIR, LOG_FILE, KEYCHAIN,
# PORT and SOCKS_PORT (shell-quoted assignments). The installed tool answers; without one (a dry
# run before the first install, an uninstall after a partial one) uv runs the checkout's.
load_paths() {
  local assignments
  assignments=$(claude_proxy paths "$@") || return 1
  eval "${assignments}"
  [ -n "${LABEL}" ] && [ -n "${PLIST}" ] && [ -n "${CONFIG_DIR}" ]
}

# Run claude-proxy: the installed tool, else (none installed yet, or no more) the checkout's via uv.
claude_proxy() {
  if [ -x "${EXE}" ]; then
    "${EXE}" "$@"
  elif command -v uv >/dev/null 2>&1; then
    direct uv -q tool run --from "${REPO}" claude-proxy "$@"
  else
    return 127
  fi
}
