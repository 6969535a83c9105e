#!/usr/bin/env bash
# Install claude-proxy as a per-user launchd agent on macOS: the tool, its CA, the agent (started at
# login, restarted if it dies), and the CA's trust in the login keychain. Safe to run again.
# bash 3.2 (macOS's own): no associative arrays, no mapfile, no ${v,,}.
set -u

HERE=$(cd "$(dirname "$0")" && pwd) || exit 1
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${HERE}/lib.sh"

KEYCHAIN_TRUST=1
ARG_PORT=""
ARG_SOCKS_PORT=""
WAIT_SECONDS="${CLAUDE_PROXY_WAIT_SECONDS:-20}"

err() {
  printf 'claude-proxy: error: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
Usage: scripts/install-agent.sh [--dry-run] [--no-keychain] [--port PORT] [--socks-port PORT] [-h]

Installs claude-proxy from this checkout (uv tool install), makes its CA, installs and starts the
launchd agent local.claude-proxy (logs in ~/Library/Logs/claude-proxy/), and trusts the CA in the
login keychain for SSL. Running it again is safe.

  -n, --dry-run          print every change instead of making it; change nothing
      --no-keychain      leave the login keychain alone
      --port PORT        HTTP proxy on 127.0.0.1:PORT and [::1]:PORT (default 9051)
      --socks-port PORT  SOCKS5 on the same addresses (default 9052)
  -h, --help             this help
EOF
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || err "$1 is needed: $2"
}

parse_args() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -n | --dry-run) DRY_RUN=1 ;;
      --no-keychain) KEYCHAIN_TRUST=0 ;;
      --port | --socks-port)
        [ "$#" -ge 2 ] || err "$1 needs a value"
        valid_port "$2" || err "$1 takes a number from 1 to 65535, not '$2'"
        if [ "$1" = "--port" ]; then ARG_PORT="$2"; else ARG_SOCKS_PORT="$2"; fi
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
}

# The versions the suite ran on: `uv tool install` does not read uv.lock, so it is given the lock's
# versions as constraints (the proxy refuses to start on any mitmproxy but the tested one).
install_tool() {
  say "installing the claude-proxy tool from ${REPO} with uv.lock's versions (uv tool install)"
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: uv export --frozen (uv.lock's versions) > CONSTRAINTS"
    say "would run: uv tool install --reinstall --compile-bytecode --constraints CONSTRAINTS ${REPO}"
    return 0
  fi
  constraints=$(mktemp "${TMPDIR:-/tmp}/claude-proxy-constraints.XXXXXX") ||
    err "cannot make a temporary file (mktemp): check \$TMPDIR and run this again"
  if ! direct uv export --quiet --frozen --no-dev --no-hashes --no-emit-project --no-header \
    --project "${REPO}" --output-file "${constraints}" >/dev/null; then
    rm -f "${constraints}"
    err "uv export failed: uv.lock is missing or out of date in ${REPO}; run 'uv lock' there and run this again"
  fi
  # Compiled now, so that the agent never compiles its imports at start (nor writes into the tool).
  if ! direct uv tool install --reinstall --compile-bytecode --constraints "${constraints}" \
    "${REPO}"; then
    rm -f "${constraints}"
    err "uv tool install failed: see its output above; fix it and run this script again"
  fi
  rm -f "${constraints}"
}

make_ca() {
  if [ "${DRY_RUN}" -eq 1 ]; then
    if [ -f "${CA_KEY}" ]; then
      say "the CA exists: ${CA_CERT}"
    else
      say "would run: ${EXE} ca (makes the CA in ${CONFIG_DIR})"
    fi
    return 0
  fi
  # `ca` changes nothing when the CA exists; it makes one (0600 key) when none does.
  "${EXE}" ca >&2 || err "could not make or read the CA (see above); fix it, then run again"
}

write_plist() {
  change mkdir -p "$(dirname "${PLIST}")" || err "could not create $(dirname "${PLIST}")"
  change mkdir -p -m 700 "${LOG_DIR}" || err "could not create ${LOG_DIR}"
  say "writing ${PLIST}"
  # The tool names itself (its installed command) and carries the config folder to the agent.
  change "${EXE}" plist --port "${PORT}" --socks-port "${SOCKS_PORT}" \
    --config-dir "${CONFIG_DIR}" --output "${PLIST}" ||
    err "could not write ${PLIST} (see above)"
  change plutil -lint "${PLIST}" >/dev/null || err "plutil rejects ${PLIST}"
}

# bootout, tolerating "not loaded" (3, 113) and waiting while a running agent drains (36).
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
      0 | 3 | 113) return 0 ;;
      36)
        tries=$((tries + 1))
        [ "${tries}" -lt 40 ] || err "the running agent did not stop (launchctl bootout: 36)"
        sleep 0.5 # 20 s in all
        ;;
      *) err "launchctl bootout ${DOMAIN}/${LABEL} failed with ${code}" ;;
    esac
  done
}

# bootstrap starts the agent (RunAtLoad): no kickstart after it, which would start it twice.
start_agent() {
  local code
  change launchctl enable "${DOMAIN}/${LABEL}" ||
    err "launchctl enable ${DOMAIN}/${LABEL} failed"
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: launchctl bootstrap ${DOMAIN} ${PLIST}"
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
}

# `status` reads the installed plist: its proxy line is ok once a TLS handshake through the agent
# verifies against the CA.
# Asked every half second (it answers about a second after the bootstrap), for at least
# WAIT_SECONDS (SECONDS counts whole seconds: its difference passes the limit only after it).
wait_until_serving() {
  local started="${SECONDS}"
  [ "${DRY_RUN}" -eq 1 ] && return 0
  say "waiting for the proxy on 127.0.0.1:${PORT}"
  while [ $((SECONDS - started)) -le "${WAIT_SECONDS}" ]; do
    if "${EXE}" status 2>/dev/null | grep -q '^ok   proxy on'; then
      say "the proxy answers on 127.0.0.1:${PORT} with the CA in ${CONFIG_DIR}"
      return 0
    fi
    sleep 0.5
  done
  warn "the proxy does not answer on 127.0.0.1:${PORT} after ${WAIT_SECONDS} s; what status says:"
  "${EXE}" status >&2 2>/dev/null
  warn "the agent's last log lines:"
  tail -n 20 "${LOG_DIR}/launchd.stderr.log" >&2 2>/dev/null || true
  err "the agent did not start: read the lines above and ${LOG_DIR}/"
}

keychain_trusts() {
  security verify-cert -c "${CA_CERT}" -p ssl -L >/dev/null 2>&1
}

# Trust the CA unless the keychain's own evaluation already trusts it for SSL: a certificate that
# is there but not trusted (say, marked "Never Trust") is trusted again.
trust_ca() {
  [ "${KEYCHAIN_TRUST}" -eq 1 ] || {
    say "leaving the login keychain alone (--no-keychain)"
    return 0
  }
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run, unless the keychain trusts the CA already:" \
      "security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${CA_CERT}"
    return 0
  fi
  if keychain_trusts; then
    say "the login keychain already trusts this CA for SSL (${CA_CERT})"
    return 0
  fi
  if [ -n "${SSH_CONNECTION:-}" ] || [ -n "${SSH_TTY:-}" ]; then
    warn "over SSH the keychain cannot ask for your password; at the Mac itself, run:"
    warn "  security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${CA_CERT}"
    return 0
  fi
  say "trusting the CA (${CA_CERT}) in the login keychain: macOS asks for your password"
  if ! security add-trusted-cert -r trustRoot -p ssl -p basic -k "${KEYCHAIN}" "${CA_CERT}" ||
    ! keychain_trusts; then
    warn "the keychain does not trust the CA; run this yourself at the Mac:"
    warn "  security add-trusted-cert -r trustRoot -p ssl -p basic -k ${KEYCHAIN} ${CA_CERT}"
    return 1
  fi
}

main() {
  local trust_failed=0
  parse_args "$@"
  [ "$(uname -s)" = "Darwin" ] || err "the agent is for macOS (launchd); on $(uname -s) run 'uv run claude-proxy' yourself"
  need_cmd uv "install it from https://docs.astral.sh/uv/ and run this again"
  need_cmd launchctl "this script needs macOS's launchctl"

  REPO=$(cd "${HERE}/.." && pwd) || err "cannot find the checkout"
  BIN_DIR=$(direct uv tool dir --bin) || err "uv tool dir --bin failed"
  EXE="${BIN_DIR}/claude-proxy"
  DOMAIN="gui/$(id -u)"
  [ "${DRY_RUN}" -eq 1 ] && say "dry run: nothing is changed"

  install_tool
  # shellcheck disable=SC2119 # this environment's paths, not the installed agent's
  load_paths || err "could not ask claude-proxy for its paths (see above)"
  PORT="${ARG_PORT:-${PORT}}"
  SOCKS_PORT="${ARG_SOCKS_PORT:-${SOCKS_PORT}}"
  [ "${PORT}" != "${SOCKS_PORT}" ] || err "--port and --socks-port must differ (both ${PORT})"
  make_ca
  write_plist
  stop_agent
  start_agent
  wait_until_serving
  trust_ca || trust_failed=1

  say "done. Point Claude Code at the proxy (add this to your shell profile):"
  if [ -x "${EXE}" ]; then
    "${EXE}" env --port "${PORT}"
  else
    say "  eval \"\$(claude-proxy env --port ${PORT})\""
  fi
  say "check with: claude-proxy status"
  if [ "${trust_failed}" -eq 1 ]; then
    err "the agent runs, but the CA is not trusted yet: see the keychain step above"
  fi
}

main "$@"
