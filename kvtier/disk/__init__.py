"""The disk tier: a region log over preallocated files with a persistent LMDB index.

Modules by role: ``format`` (the entry header), ``codec`` (optional zstd), ``device`` (aligned file I/O and
a fault-injecting memory device), ``index`` (LMDB, group-committed), ``tier`` (``DiskTier``, the API the
store calls), ``admission`` (which offered blocks are worth a flash write).
"""

from kvtier.disk.admission import AdmissionPolicy, make_admission
from kvtier.disk.device import Device, FileDevice, MemoryDevice, aligned_tensor, supports_direct_io
from kvtier.disk.format import FORMAT_VERSION
from kvtier.disk.tier import Admission, DiskStats, DiskTier

__all__ = [
    "FORMAT_VERSION",
    "Admission",
    "AdmissionPolicy",
    "Device",
    "DiskStats",
    "DiskTier",
    "FileDevice",
    "MemoryDevice",
    "aligned_tensor",
    "make_admission",
    "supports_direct_io",
]
