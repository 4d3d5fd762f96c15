"""Where the published-implementation parity fixture lives (``tests/fixtures``, see its README).

The parity tests are the evidence behind the README's central claim, so a missing fixture is a
failure with the path in the message, never a skip.
"""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY_NPZ = FIXTURES / "fsfm_tiny_parity.npz"
PARITY_JSON = FIXTURES / "fsfm_tiny_parity.json"


def require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"parity fixture {path} is missing: it ships with the repository "
                                "(git checkout the tests/fixtures folder)")
    return path
