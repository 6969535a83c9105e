#!/usr/bin/env bash
# Undo scripts/install-agent.sh: stop and remove the launchd agent, take back the Claude Code and srt
# settings `claude-proxy setup` wrote (they point at ports nothing will listen on), remove the CA's
# trust and the certificate (by SHA-1 only: every mitmproxy CA is named "mitmproxy"), uninstall the
# tool. Keeps the CA and the logs unless --purge, and config.toml unless --purge-config. Carries on
# past a failing step and reports each one. bash 3.2 (macOS's own).
set -u

HERE=$(cd "$(dirname "$0")" && pwd) || exit 1
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${HERE}/lib.sh"

PURGE=0
PURGE_CONFIG=0
FAILURES=0
TRUST_KEPT=0 # the keychain may still trust the CA: its certificate file is needed to undo that
TOOL_KEPT=0  # a settings file only root may change still names claude-proxy: the tool undoes it

fail() {
  printf 'claude-proxy: failed: %s\n' "$*" >&2
  FAILURES=$((FAILURES + 1))
}

usage() {
  cat <<EOF
Usage: scripts/uninstall-agent.sh [--dry-run] [--purge] [--purge-config] [-h]

Stops and removes the launchd agent local.claude-proxy, takes back what \`claude-proxy setup\`
wrote into Claude Code's and srt's settings (the managed settings file needs root: it names the
command), removes the CA's trust and certificate from the login keychain, and uninstalls the
claude-proxy tool. Keeps the CA (the installed agent's config folder) and
~/Library/Logs/claude-proxy unless --purge. Safe when nothing, or only part, is installed.

  -n, --dry-run       print every change instead of making it; change nothing
      --purge         also delete the CA and the logs; your policy (config.toml) stays
      --purge-config  --purge, and delete config.toml too
  -h, --help          this help
EOF
}

parse_args() {
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -n | --dry-run) DRY_RUN=1 ;;
      --purge) PURGE=1 ;;
      --purge-config) PURGE=1 PURGE_CONFIG=1 ;;
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
        if [ "${tries}" -ge 40 ]; then
          fail "the agent did not stop (launchctl bootout: 36); try again in a moment"
          return 0
        fi
        sleep 0.5 # 20 s in all
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

# SHA-1 of the agent's CA certificate (CA_CERT), uppercase hex. Not `claude-proxy ca --sha1`:
# that reads this shell's config folder, and makes a CA there if it has none.
ca_sha1() {
  openssl x509 -noout -fingerprint -sha1 -in "${CA_CERT}" | sed 's/^.*=//; s/://g' |
    tr '[:lower:]' '[:upper:]'
}

# Whether the user's trust settings still name the certificate $1 (SHA-1): 0 yes, 1 no, 2 unknown.
has_trust_settings() {
  local exported said code=2
  exported=$(mktemp -t claude-proxy-trust.XXXXXX) || return 2
  if said=$(security trust-settings-export "${exported}" 2>&1); then
    if grep -q "<key>$1</key>" "${exported}"; then code=0; else code=1; fi
  else
    case "${said}" in
      *"No Trust Settings"*) code=1 ;;
    esac
  fi
  rm -f "${exported}"
  return "${code}"
}

untrust_ca() {
  local sha1 said
  if [ ! -f "${CA_CERT}" ]; then
    say "no CA certificate at ${CA_CERT}: nothing to remove from the keychain"
    return 0
  fi
  sha1=$(ca_sha1)
  if [ -z "${sha1}" ]; then
    fail "could not read the SHA-1 of ${CA_CERT}; remove its trust in Keychain Access by hand"
    TRUST_KEPT=1
    return 0
  fi
  if [ "${DRY_RUN}" -eq 1 ]; then
    say "would run: security remove-trusted-cert ${CA_CERT}"
  elif said=$(security remove-trusted-cert "${CA_CERT}" 2>&1); then
    say "removed the CA's trust settings"
  else
    # It also fails when there was nothing to remove: only trust that is still there is a failure.
    has_trust_settings "${sha1}"
    case "$?" in
      1) say "the CA had no trust settings" ;;
      *)
        fail "security remove-trusted-cert ${CA_CERT}: ${said:-exit status non-zero}"
        TRUST_KEPT=1
        ;;
    esac
  fi
  if security find-certificate -a -Z "${KEYCHAIN}" 2>/dev/null | grep -q "SHA-1 hash: ${sha1}"; then
    change security delete-certificate -Z "${sha1}" "${KEYCHAIN}" >/dev/null ||
      fail "security delete-certificate -Z ${sha1} ${KEYCHAIN}"
  else
    say "the login keychain holds no certificate with SHA-1 ${sha1}"
  fi
}

uninstall_tool() {
  if direct uv tool list 2>/dev/null | grep -q '^claude-proxy '; then
    change direct uv tool uninstall claude-proxy >/dev/null || fail "uv tool uninstall claude-proxy"
  else
    say "the claude-proxy tool is not installed"
  fi
}

# What setup wrote names ports nothing will listen on: take it back while the tool is here.
undo_settings() {
  local said code
  if [ "${DRY_RUN}" -eq 1 ]; then
    said=$(claude_proxy setup undo-all --dry-run 2>&1)
  else
    said=$(claude_proxy setup undo-all --yes 2>&1)
  fi
  code=$?
  [ -n "${said}" ] && printf '%s\n' "${said}" >&2
  case "${code}" in
    0) return 0 ;;
    127) fail "cannot run claude-proxy to take back its settings: run \`claude-proxy setup undo-all\`" ;;
    *)
      fail "claude-proxy setup undo-all exited ${code}: see above"
      TOOL_KEPT=1
      ;;
  esac
}

purge() {
  local entry
  if [ "${TRUST_KEPT}" -eq 1 ]; then
    warn "kept ${CONFIG_DIR}: the keychain may still trust its CA, and removing that trust needs" \
      "${CA_CERT}; fix the failure above, then run this again"
  elif [ -e "${CONFIG_DIR}" ]; then
    for entry in "${CONFIG_DIR}"/* "${CONFIG_DIR}"/.[!.]*; do
      [ -e "${entry}" ] || continue
      if [ "${entry}" = "${CONFIG_FILE}" ] && [ "${PURGE_CONFIG}" -eq 0 ]; then
        say "kept ${CONFIG_FILE} (your policy); --purge-config removes it too"
        continue
      fi
      change rm -rf "${entry}" || fail "could not remove ${entry}"
    done
    if [ "${PURGE_CONFIG}" -eq 1 ] || [ ! -e "${CONFIG_FILE}" ]; then
      change rmdir "${CONFIG_DIR}" || fail "could not remove ${CONFIG_DIR}"
    fi
  fi
  if [ -e "${LOG_DIR}" ]; then
    change rm -rf "${LOG_DIR}" || fail "could not remove ${LOG_DIR}"
  fi
}

main() {
  parse_args "$@"
  if [ "$(uname -s)" != "Darwin" ]; then
    printf 'claude-proxy: error: the agent is for macOS; nothing to uninstall on %s\n' "$(uname -s)" >&2
    exit 1
  fi
  DOMAIN="gui/$(id -u)"
  REPO=$(cd "${HERE}/.." && pwd) || exit 1
  if command -v uv >/dev/null 2>&1; then
    EXE="$(direct uv tool dir --bin 2>/dev/null)/claude-proxy"
  fi
  # The installed agent's own config folder and ports, read from its plist while it is there.
  if ! load_paths --installed; then
    printf 'claude-proxy: error: could not ask claude-proxy for its paths (needs uv): nothing done\n' >&2
    exit 1
  fi
  [ "${DRY_RUN}" -eq 1 ] && say "dry run: nothing is changed"

  stop_agent
  remove_plist
  undo_settings
  untrust_ca
  if [ "${TOOL_KEPT}" -eq 1 ]; then
    warn "kept the claude-proxy tool: take back the settings named above with it, then run this again"
  elif [ -n "${EXE}" ]; then
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
