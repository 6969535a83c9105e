#!/usr/bin/env bash
# Undo scripts/install-agent.sh: stop and remove the launchd agent, remove the CA's trust and the
# certificate (by SHA-1 only: every mitmproxy CA is named "mitmproxy"), uninstall the tool. Keeps
# the CA and the logs unless --purge. Carries on past a failing step and reports each one.
# bash 3.2 (macOS's own).
set -u

LABEL="local.claude-proxy"
DRY_RUN=0
PURGE=0
FAILURES=0

say() { printf 'claude-proxy: %s\n' "$*" >&2; }
warn() { printf 'claude-proxy: warning: %s\n' "$*" >&2; }
fail() {
  printf 'claude-proxy: failed: %s\n' "$*" >&2
  FAILURES=$((FAILURES + 1))
}

usage() {
  cat <<EOF
Usage: scripts/uninstall-agent.sh [--dry-run] [--purge] [-h]

Stops and removes the launchd agent ${LABEL}, removes the CA's trust and certificate from the
login keychain, and uninstalls the claude-proxy tool. Keeps ~/.config/claude-proxy (the CA) and
~/Library/Logs/claude-proxy unless --purge. Safe when nothing, or only part, is installed.

  -n, --dry-run  print every change instead of making it
      --purge    also delete the CA and the logs
  -h, --help     this help
EOF
}

change() {
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: $*"
    return 0
  fi
  "$@"
}

parse_args() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -n | --dry-run) DRY_RUN=1 ;;
      --purge) PURGE=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *)
        printf 'claude-proxy: error: unknown option %s (see --help)\n' "'$1'" >&2
        exit 2
        ;;
    esac
    shift
  done
}

stop_agent() {
  local tries=0 code
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: launchctl bootout ${DOMAIN}/${LABEL}"
    return 0
  fi
  while :; do
    launchctl bootout "${DOMAIN}/${LABEL}" 2>/dev/null
    code=$?
    case "${code}" in
      0) say "stopped the agent" && return 0 ;;
      3 | 113) say "the agent was not loaded" && return 0 ;;
      36)
        tries=$((tries + 1))
        if [ "${tries}" -ge 20 ]; then
          fail "the agent did not stop (launchctl bootout: 36); try again in a moment"
          return 0
        fi
        sleep 1
        ;;
      *)
        fail "launchctl bootout ${DOMAIN}/${LABEL} exited ${code}"
        return 0
        ;;
    esac
  done
}

remove_plist() {
  if [ -e "${PLIST}" ]; then
    change rm -f "${PLIST}" || fail "could not remove ${PLIST}"
  else
    say "no plist at ${PLIST}"
  fi
}

# SHA-1 of our CA certificate, uppercase hex: from the tool if it is still there, else openssl.
ca_sha1() {
  if [ -x "${EXE}" ] && "${EXE}" ca --sha1 2>/dev/null; then
    return 0
  else
    openssl x509 -noout -fingerprint -sha1 -in "${CERT}" | sed 's/^.*=//; s/://g' |
      tr '[:lower:]' '[:upper:]'
  fi
}

untrust_ca() {
  local sha1
  if [ ! -f "${CERT}" ]; then
    say "no CA certificate at ${CERT}: nothing to remove from the keychain"
    return 0
  fi
  sha1=$(ca_sha1)
  if [ -z "${sha1}" ]; then
    fail "could not read the SHA-1 of ${CERT}; remove its trust in Keychain Access by hand"
    return 0
  fi
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: security remove-trusted-cert ${CERT}"
  elif security remove-trusted-cert "${CERT}" >/dev/null 2>&1; then
    say "removed the CA's trust settings"
  else
    say "the CA had no trust settings"
  fi
  if security find-certificate -a -Z "${KEYCHAIN}" 2>/dev/null | grep -q "SHA-1 hash: ${sha1}"; then
    change security delete-certificate -Z "${sha1}" "${KEYCHAIN}" >/dev/null ||
      fail "security delete-certificate -Z ${sha1} ${KEYCHAIN}"
  else
    say "the login keychain holds no certificate with SHA-1 ${sha1}"
  fi
}

uninstall_tool() {
  if uv tool list 2>/dev/null | grep -q '^claude-proxy '; then
    change uv tool uninstall claude-proxy >/dev/null || fail "uv tool uninstall claude-proxy"
  else
    say "the claude-proxy tool is not installed"
  fi
}

purge() {
  local dir
  for dir in "${CONFIG_DIR}" "${LOG_DIR}"; do
    if [ -e "${dir}" ]; then
      change rm -rf "${dir}" || fail "could not remove ${dir}"
    fi
  done
}

main() {
  parse_args "$@"
  if [ "$(uname -s)" != "Darwin" ]; then
    printf 'claude-proxy: error: the agent is for macOS; nothing to uninstall on %s\n' "$(uname -s)" >&2
    exit 1
  fi
  DOMAIN="gui/$(id -u)"
  PLIST="${HOME}/Library/LaunchAgents/${LABEL}.plist"
  LOG_DIR="${HOME}/Library/Logs/claude-proxy"
  CONFIG_DIR="${XDG_CONFIG_HOME:-${HOME}/.config}/claude-proxy"
  CERT="${CONFIG_DIR}/mitmproxy-ca-cert.pem"
  KEYCHAIN="${HOME}/Library/Keychains/login.keychain-db"
  EXE=""
  if command -v uv >/dev/null 2>&1; then
    EXE="$(uv tool dir --bin 2>/dev/null)/claude-proxy"
  fi
  [ "${DRY_RUN}" -eq 1 ] && say "dry run: nothing is changed"

  stop_agent
  remove_plist
  untrust_ca
  if [ -n "${EXE}" ]; then
    uninstall_tool
  else
    say "uv is not installed: skipping uv tool uninstall"
  fi
  if [ "${PURGE}" -eq 1 ]; then
    purge
  else
    say "kept ${CONFIG_DIR} (the CA) and ${LOG_DIR}; --purge removes them"
  fi

  if [ "${FAILURES}" -gt 0 ]; then
    say "${FAILURES} step(s) failed: see above"
    exit 1
  fi
  say "uninstalled"
}

main "$@"
