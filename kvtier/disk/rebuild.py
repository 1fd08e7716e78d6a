"""Rebuild the disk tier's index from its data files, after the index was found damaged.

Every entry starts with a checksummed header (magic, format version, key, lengths, codec, payload checksum),
and entries follow each other in a region at ``entry_bytes(stored_len)`` strides from offset 0. A scan reads
the header page of each entry of each region, in order, until a page that holds no valid header.

Promises: ``scan_regions`` reads only header pages (one page per entry), never writes; it returns, per
region that holds any, the entries whose header verified and whose lengths fit this layout and the region.
Payloads are not read: a torn or stale payload fails its checksum when it is read, a miss like any other.
A read error ends that region's scan (its entries found so far are kept).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.disk.device import Device, aligned_buffer
from kvtier.disk.format import PAGE_BYTES, entry_bytes, parse_header
from kvtier.disk.index import IndexEntry


def scan_regions(devices: Sequence[Device], regions_per_path: int, region_bytes: int,
                 block_bytes: int) -> dict[int, list[tuple[bytes, IndexEntry]]]:
    """The verified entries of each region (region ``r`` lives in ``devices[r % len(devices)]``)."""
    page = memoryview(aligned_buffer(PAGE_BYTES))
    found: dict[int, list[tuple[bytes, IndexEntry]]] = {}
    num_paths = len(devices)
    for region in range(regions_per_path * num_paths):
        path = region % num_paths
        base = region // num_paths * region_bytes
        offset = 0
        entries: list[tuple[bytes, IndexEntry]] = []
        while offset + PAGE_BYTES <= region_bytes:
            try:
                if devices[path].read(base + offset, [page]) != PAGE_BYTES:
                    break
            except OSError:
                break
            parsed = parse_header(page)
            if parsed is None:
                break
            header, header_checksum = parsed
            end = offset + entry_bytes(header.stored_len)
            if header.raw_len != block_bytes or not 0 < header.stored_len <= block_bytes or end > region_bytes:
                break
            entries.append((header.key, IndexEntry(path, region, offset, header.stored_len, header.raw_len,
                                                   header.codec, header.planes, header_checksum,
                                                   header.payload_checksum)))
            offset = end
        if entries:
            found[region] = entries
    return found
