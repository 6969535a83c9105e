#!/usr/bin/env bash
# Install claude-proxy as a per-user launchd agent on macOS: the tool, its CA, the agent (started at
# login, restarted if it dies), and the CA's trust in the login keychain. Safe to run again.
# bash 3.2 (macOS's own): no associative arrays, no mapfile, no ${v,,}.
set -u

LABEL="local.claude-proxy"
PORT=9051
DRY_RUN=0
KEYCHAIN_TRUST=1
WAIT_SECONDS="${CLAUDE_PROXY_WAIT_SECONDS:-20}"

say() { printf 'claude-proxy: %s\n' "$*" >&2; }
warn() { printf 'claude-proxy: warning: %s\n' "$*" >&2; }
err() {
  printf 'claude-proxy: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
Usage: scripts/install-agent.sh [--dry-run] [--no-keychain] [--port PORT] [-h]

Installs claude-proxy from this checkout (uv tool install), makes its CA, installs and starts the
launchd agent ${LABEL} (logs in ~/Library/Logs/claude-proxy/), and trusts the CA in the login
keychain for SSL. Running it again is safe.

  -n, --dry-run    print every change instead of making it
      --no-keychain  leave the login keychain alone
      --port PORT  listen on 127.0.0.1:PORT (default ${PORT})
  -h, --help       this help
EOF
}

# Run a command that changes something, or only print it with --dry-run.
change() {
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: $*"
    return 0
  fi
  "$@"
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || err "$1 is needed: $2"
}

parse_args() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -n | --dry-run) DRY_RUN=1 ;;
      --no-keychain) KEYCHAIN_TRUST=0 ;;
      --port)
        [ "$#" -ge 2 ] || err "--port needs a value"
        PORT="$2"
        shift
        ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) err "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  case "${PORT}" in
    '' | *[!0-9]*) err "--port takes a number from 1 to 65535, not '${PORT}'" ;;
  esac
  if [ "${PORT}" -lt 1 ] || [ "${PORT}" -gt 65535 ]; then
    err "--port takes a number from 1 to 65535, not '${PORT}'"
  fi
}

install_tool() {
  say "installing the claude-proxy tool from ${REPO} (uv tool install)"
  change uv tool install --reinstall "${REPO}" ||
    err "uv tool install failed: see its output above; fix it and run this script again"
}

make_ca() {
  if [ "${DRY_RUN}" -eq 1 ] && [ ! -x "${EXE}" ]; then
    say "would run: ${EXE} ca"
    return 0
  fi
  # `ca` changes nothing when the CA exists; it makes one (0600 key) when none does.
  "${EXE}" ca >&2 || err "could not make or read the CA (see above); fix it, then run again"
}

write_plist() {
  change mkdir -p "${HOME}/Library/LaunchAgents" "${LOG_DIR}" ||
    err "could not create ~/Library/LaunchAgents or ${LOG_DIR}"
  say "writing ${PLIST}"
  change "${EXE}" plist --template "${REPO}/launchd/${LABEL}.plist" --port "${PORT}" \
    --executable "${EXE}" --output "${PLIST}" ||
    err "could not write ${PLIST} (see above)"
  change plutil -lint "${PLIST}" >/dev/null || err "plutil rejects ${PLIST}"
}

# bootout, tolerating "not loaded" (3, 113) and waiting while a running agent drains (36).
stop_agent() {
  local tries=0 code
  while :; do
    if [ "${DRY_RUN}" -eq 1 ]; then
      say "would run: launchctl bootout ${DOMAIN}/${LABEL}"
      return 0
    fi
    launchctl bootout "${DOMAIN}/${LABEL}" 2>/dev/null
    code=$?
    case "${code}" in
      0 | 3 | 113) return 0 ;;
      36)
        tries=$((tries + 1))
        [ "${tries}" -lt 20 ] || err "the running agent did not stop (launchctl bootout: 36)"
        sleep 1
        ;;
      *) err "launchctl bootout ${DOMAIN}/${LABEL} failed with ${code}" ;;
    esac
  done
}

start_agent() {
  local code
  change launchctl enable "${DOMAIN}/${LABEL}" ||
    err "launchctl enable ${DOMAIN}/${LABEL} failed"
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: launchctl bootstrap ${DOMAIN} ${PLIST}"
    say "would run: launchctl kickstart -k ${DOMAIN}/${LABEL}"
    return 0
  fi
  launchctl bootstrap "${DOMAIN}" "${PLIST}"
  code=$?
  if [ "${code}" -eq 5 ] || [ "${code}" -eq 37 ]; then
    sleep 1 # already loaded or still draining: once more
    launchctl bootstrap "${DOMAIN}" "${PLIST}"
    code=$?
  fi
  case "${code}" in
    0) ;;
    119) err "the agent is disabled (launchctl bootstrap: 119); run: launchctl enable ${DOMAIN}/${LABEL}" ;;
    125) err "no GUI session for ${DOMAIN} (launchctl bootstrap: 125, e.g. over SSH): log in at the Mac and run this again" ;;
    *) err "launchctl bootstrap ${DOMAIN} ${PLIST} failed with ${code}" ;;
  esac
  launchctl kickstart -k "${DOMAIN}/${LABEL}" || err "launchctl kickstart ${DOMAIN}/${LABEL} failed"
}

wait_until_serving() {
  local waited=0
  [ "${DRY_RUN}" -eq 1 ] && return 0
  say "waiting for the proxy on 127.0.0.1:${PORT}"
  while [ "${waited}" -lt "${WAIT_SECONDS}" ]; do
    if "${EXE}" status --port "${PORT}" 2>/dev/null | grep -q '^ok   proxy on'; then
      say "the proxy answers on 127.0.0.1:${PORT}"
      return 0
    fi
    sleep 1
    waited=$((waited + 1))
  done
  warn "the proxy does not answer on 127.0.0.1:${PORT} after ${WAIT_SECONDS} s; its last log lines:"
  tail -n 20 "${LOG_DIR}/launchd.stderr.log" >&2 2>/dev/null || true
  err "the agent did not start: read the lines above and ${LOG_DIR}/"
}

trust_ca() {
  local cert sha1 exported
  [ "${KEYCHAIN_TRUST}" -eq 1 ] || {
    say "leaving the login keychain alone (--no-keychain)"
    return 0
  }
  cert="${CONFIG_DIR}/mitmproxy-ca-cert.pem"
  if [ "${DRY_RUN}" -eq 1 ] && [ ! -x "${EXE}" ]; then
    say "would run: security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${cert}"
    return 0
  fi
  sha1=$("${EXE}" ca --sha1) || err "could not read the CA's fingerprint"
  exported=$(mktemp -t claude-proxy-trust.XXXXXX) || err "mktemp failed"
  if security trust-settings-export "${exported}" >/dev/null 2>&1 &&
    grep -q "<key>${sha1}</key>" "${exported}"; then
    rm -f "${exported}"
    say "the login keychain already trusts this CA (SHA-1 ${sha1})"
    return 0
  fi
  rm -f "${exported}"
  if [ -n "${SSH_CONNECTION:-}" ] || [ -n "${SSH_TTY:-}" ]; then
    warn "over SSH the keychain cannot ask for your password; at the Mac itself, run:"
    warn "  security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${cert}"
    return 0
  fi
  say "trusting the CA (SHA-1 ${sha1}) in the login keychain: macOS asks for your password"
  if ! change security add-trusted-cert -r trustRoot -p ssl -p basic -k "${KEYCHAIN}" "${cert}"; then
    warn "the keychain did not take the CA; run this yourself at the Mac:"
    warn "  security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${cert}"
    return 1
  fi
}

main() {
  parse_args "$@"
  [ "$(uname -s)" = "Darwin" ] || err "the agent is for macOS (launchd); on $(uname -s) run 'uv run claude-proxy' yourself"
  need_cmd uv "install it from https://docs.astral.sh/uv/ and run this again"
  need_cmd launchctl "this script needs macOS's launchctl"

  REPO=$(cd "$(dirname "$0")/.." && pwd) || err "cannot find the checkout"
  BIN_DIR=$(uv tool dir --bin) || err "uv tool dir --bin failed"
  EXE="${BIN_DIR}/claude-proxy"
  DOMAIN="gui/$(id -u)"
  PLIST="${HOME}/Library/LaunchAgents/${LABEL}.plist"
  LOG_DIR="${HOME}/Library/Logs/claude-proxy"
  CONFIG_DIR="${XDG_CONFIG_HOME:-${HOME}/.config}/claude-proxy"
  KEYCHAIN="${HOME}/Library/Keychains/login.keychain-db"
  [ "${DRY_RUN}" -eq 1 ] && say "dry run: nothing is changed"

  install_tool
  make_ca
  write_plist
  stop_agent
  start_agent
  wait_until_serving
  trust_failed=0
  trust_ca || trust_failed=1

  say "done. Point Claude Code at the proxy (add this to your shell profile):"
  if [ -x "${EXE}" ]; then
    "${EXE}" env --port "${PORT}"
  else
    say "  eval \"\$(claude-proxy env --port ${PORT})\""
  fi
  say "check with: claude-proxy status --port ${PORT}"
  if [ "${trust_failed}" -eq 1 ]; then
    err "the agent runs, but the CA is not trusted yet: see the keychain step above"
  fi
}

main "$@"
