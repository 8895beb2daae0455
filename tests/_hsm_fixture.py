"""The one SoftHSM dev token a pytest process uses.

python-pkcs11 loads libsofthsm2 once per process and SoftHSM reads
SOFTHSM2_CONF only then, so every test module must share this token: use the
``hsm_devtoken`` fixture from here (tests/conftest.py re-exports it) rather
than making a token of your own. Set FEDTOKEN_TEST_STATE to keep the token
across runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtoken.hsm.devtoken import DevToken, ensure_dev_token

TEST_TOKEN_LABEL = "fedtoken-test"

# pytest runs a session fixture once per place it is registered (conftest and
# any test module importing it), but the token must be one per process.
_process_token: list[DevToken] = []


@pytest.fixture(scope="session")
def hsm_devtoken(tmp_path_factory: pytest.TempPathFactory) -> DevToken:
    if not _process_token:
        state = Path(os.environ.get("FEDTOKEN_TEST_STATE") or tmp_path_factory.mktemp("state"))
        token = ensure_dev_token(state, TEST_TOKEN_LABEL)
        conf = os.environ.setdefault("SOFTHSM2_CONF", str(token.conf_path))
        assert conf == str(token.conf_path), (
            f"SOFTHSM2_CONF={conf} is set but the test token's config is {token.conf_path}: "
            "unset SOFTHSM2_CONF, or point FEDTOKEN_TEST_STATE at that config's state directory"
        )
        _process_token.append(token)
    return _process_token[0]
