// Gather and scatter of paged KV: the pages of many blocks of every layer in one launch.
//
// Promises (kvtier/native.py is the only caller and checks every argument first):
// - A "segment" is one layer's paged cache (or one of its K/V planes) seen as rows of bytes: row b
//   (an engine block id) starts at src_ptrs[s] + b * row_strides[s] and holds page_bytes bytes.
// - The staging buffer is contiguous and ordered (chunk, segment, page-in-chunk, byte), where the
//   i-th block id belongs to chunk i / pages_per_chunk: a chunk of pages_per_chunk engine blocks of
//   all segments is one kvtier block, in one piece.
// - Only segments [segment_begin, segment_end) are copied (one layer at a time, for layer-wise saves
//   and restores); staging offsets always count all num_segments segments.
// - kvtier_gather copies pages into the staging buffer, kvtier_scatter copies them back; the staging
//   buffer may be device memory or pinned host memory mapped into the device's address space.
// - One CUDA block per (block id, segment) pair; 16-byte loads and stores when every address and
//   page_bytes allow it, bytes otherwise. Nothing is allocated, nothing synchronises.
// - No #include: NVRTC (CuPy's RawModule) compiles this file without the C library's headers.

namespace {

__device__ __forceinline__ void copy_page(unsigned char* dst, const unsigned char* src, long long nbytes,
                                          bool vector) {
    if (vector) {
        // 16-byte words keep PCIe writes to mapped host memory in full transactions.
        const uint4* src16 = reinterpret_cast<const uint4*>(src);
        uint4* dst16 = reinterpret_cast<uint4*>(dst);
        const long long nwords = nbytes / 16;
        for (long long w = threadIdx.x; w < nwords; w += blockDim.x) {
            dst16[w] = src16[w];
        }
    } else {
        for (long long i = threadIdx.x; i < nbytes; i += blockDim.x) {
            dst[i] = src[i];
        }
    }
}

__device__ __forceinline__ long long staging_offset(long long pair, int num_segments, int segment_begin,
                                                    int segment_end, int pages_per_chunk, long long page_bytes,
                                                    long long* block_index, int* segment) {
    const int active = segment_end - segment_begin;
    *block_index = pair / active;
    *segment = segment_begin + static_cast<int>(pair % active);
    const long long chunk = *block_index / pages_per_chunk;
    const long long page = *block_index % pages_per_chunk;
    return ((chunk * num_segments + *segment) * pages_per_chunk + page) * page_bytes;
}

}  // namespace

extern "C" __global__ void kvtier_gather(const unsigned long long* __restrict__ src_ptrs,
                                         const long long* __restrict__ row_strides,
                                         const long long* __restrict__ block_ids,
                                         unsigned char* __restrict__ staging, long long num_block_ids,
                                         int num_segments, int segment_begin, int segment_end,
                                         long long page_bytes, int pages_per_chunk, int vector) {
    const long long num_pairs = num_block_ids * (segment_end - segment_begin);
    for (long long pair = blockIdx.x; pair < num_pairs; pair += gridDim.x) {
        long long block_index;
        int segment;
        const long long offset =
            staging_offset(pair, num_segments, segment_begin, segment_end, pages_per_chunk, page_bytes,
                           &block_index, &segment);
        const unsigned char* src = reinterpret_cast<const unsigned char*>(src_ptrs[segment]) +
                                   block_ids[block_index] * row_strides[segment];
        copy_page(staging + offset, src, page_bytes, vector != 0);
    }
}

extern "C" __global__ void kvtier_scatter(const unsigned long long* __restrict__ dst_ptrs,
                                          const long long* __restrict__ row_strides,
                                          const long long* __restrict__ block_ids,
                                          const unsigned char* __restrict__ staging, long long num_block_ids,
                                          int num_segments, int segment_begin, int segment_end,
                                          long long page_bytes, int pages_per_chunk, int vector) {
    const long long num_pairs = num_block_ids * (segment_end - segment_begin);
    for (long long pair = blockIdx.x; pair < num_pairs; pair += gridDim.x) {
        long long block_index;
        int segment;
        const long long offset =
            staging_offset(pair, num_segments, segment_begin, segment_end, pages_per_chunk, page_bytes,
                           &block_index, &segment);
        unsigned char* dst = reinterpret_cast<unsigned char*>(dst_ptrs[segment]) +
                             block_ids[block_index] * row_strides[segment];
        copy_page(dst, staging + offset, page_bytes, vector != 0);
    }
}
