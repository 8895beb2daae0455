#!/bin/sh
# Create (if needed) a SoftHSM token for fedtoken development or a test rig.
#
#   softhsm/init-token.sh STATE_DIR [LABEL]
#
# Prints SOFTHSM2_CONF, PKCS11_MODULE, TOKEN_LABEL and PIN_FILE as shell
# assignments (eval "$(softhsm/init-token.sh ./state)" to use them). The PINs
# are random and stay in STATE_DIR/softhsm/{pin,so-pin} (mode 0600); they are
# never printed. Idempotent. Set PYTHON to choose the interpreter.
set -eu

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 STATE_DIR [LABEL]" >&2
    exit 2
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$repo/server${PYTHONPATH:+:$PYTHONPATH}" \
    exec "${PYTHON:-python3}" -m fedtoken.hsm.devtoken "$@"
