// Gather and scatter of paged KV: the pages of many blocks of every layer in one launch.
//
// Promises (kvtier/native.py is the only caller and checks every argument first):
// - A "segment" is one layer's paged cache (or one of its K/V planes) seen as rows of bytes: row b
//   (an engine block id) starts at src_ptrs[s] + b * row_strides[s] and holds page_bytes bytes.
// - The i-th block id belongs to chunk c = i / pages_per_chunk. Chunk c lives at
//   staging + slot(c) * chunk_stride, where slot(c) is slot_ids[c] (arena slots, in place) or c itself
//   when slot_ids is null (one contiguous staging buffer). Inside a chunk the order is
//   (segment, page-in-chunk, byte): a chunk of pages_per_chunk engine blocks of all segments is one
//   kvtier block, in one piece.
// - Only segments [segment_begin, segment_end) are copied (one layer range at a time, for layer-wise
//   saves and restores); offsets inside a chunk always count all num_segments segments.
// - kvtier_gather copies pages into the chunks, kvtier_scatter copies them back; the chunks may be
//   device memory or page-locked host memory mapped into the device's address space (zero copy).
// - Each CUDA block loops over (block id, segment) pairs, as many blocks as the host code launches (a few
//   when the chunks are host memory); 16-byte loads and stores when every address and page_bytes allow
//   it, bytes otherwise. Nothing is allocated, nothing synchronises.
// - No #include: NVRTC (CuPy's RawModule) compiles this file without the C library's headers.

namespace {

// Each thread keeps KVTIER_UNROLL loads in flight before it stores: reads of mapped host memory wait about 2 us
// on the bus, so the link is saturated by the bytes in flight, not by the number of SMs (the host code
// launches a few CUDA blocks for such copies).
#define KVTIER_UNROLL 4

__device__ __forceinline__ void copy_page(unsigned char* dst, const unsigned char* src, long long nbytes,
                                          bool vector) {
    if (vector) {
        // 16-byte words keep PCIe writes to mapped host memory in full transactions.
        const uint4* src16 = reinterpret_cast<const uint4*>(src);
        uint4* dst16 = reinterpret_cast<uint4*>(dst);
        const long long nwords = nbytes / 16;
        const long long step = static_cast<long long>(blockDim.x) * KVTIER_UNROLL;
        for (long long w = threadIdx.x; w < nwords; w += step) {
            uint4 words[KVTIER_UNROLL];
#pragma unroll
            for (int u = 0; u < KVTIER_UNROLL; ++u) {
                const long long i = w + static_cast<long long>(u) * blockDim.x;
                if (i < nwords) {
                    words[u] = src16[i];
                }
            }
#pragma unroll
            for (int u = 0; u < KVTIER_UNROLL; ++u) {
                const long long i = w + static_cast<long long>(u) * blockDim.x;
                if (i < nwords) {
                    dst16[i] = words[u];
                }
            }
        }
    } else {
        for (long long i = threadIdx.x; i < nbytes; i += blockDim.x) {
            dst[i] = src[i];
        }
    }
}

__device__ __forceinline__ long long chunk_offset(long long pair, const long long* __restrict__ slot_ids,
                                                  long long chunk_stride, int num_segments, int segment_begin,
                                                  int segment_end, int pages_per_chunk, long long page_bytes,
                                                  long long* block_index, int* segment) {
    const int active = segment_end - segment_begin;
    *block_index = pair / active;
    *segment = segment_begin + static_cast<int>(pair % active);
    const long long chunk = *block_index / pages_per_chunk;
    const long long page = *block_index % pages_per_chunk;
    const long long slot = slot_ids != nullptr ? slot_ids[chunk] : chunk;
    return slot * chunk_stride + (static_cast<long long>(*segment) * pages_per_chunk + page) * page_bytes;
}

}  // namespace

extern "C" __global__ void kvtier_gather(const unsigned long long* __restrict__ src_ptrs,
                                         const long long* __restrict__ row_strides,
                                         const long long* __restrict__ block_ids,
                                         const long long* __restrict__ slot_ids,
                                         unsigned char* __restrict__ chunks, long long chunk_stride,
                                         long long num_block_ids, int num_segments, int segment_begin,
                                         int segment_end, long long page_bytes, int pages_per_chunk,
                                         int vector) {
    const long long num_pairs = num_block_ids * (segment_end - segment_begin);
    for (long long pair = blockIdx.x; pair < num_pairs; pair += gridDim.x) {
        long long block_index;
        int segment;
        const long long offset = chunk_offset(pair, slot_ids, chunk_stride, num_segments, segment_begin,
                                              segment_end, pages_per_chunk, page_bytes, &block_index, &segment);
        const unsigned char* src = reinterpret_cast<const unsigned char*>(src_ptrs[segment]) +
                                   block_ids[block_index] * row_strides[segment];
        copy_page(chunks + offset, src, page_bytes, vector != 0);
    }
}

extern "C" __global__ void kvtier_scatter(const unsigned long long* __restrict__ dst_ptrs,
                                          const long long* __restrict__ row_strides,
                                          const long long* __restrict__ block_ids,
                                          const long long* __restrict__ slot_ids,
                                          const unsigned char* __restrict__ chunks, long long chunk_stride,
                                          long long num_block_ids, int num_segments, int segment_begin,
                                          int segment_end, long long page_bytes, int pages_per_chunk,
                                          int vector) {
    const long long num_pairs = num_block_ids * (segment_end - segment_begin);
    for (long long pair = blockIdx.x; pair < num_pairs; pair += gridDim.x) {
        long long block_index;
        int segment;
        const long long offset = chunk_offset(pair, slot_ids, chunk_stride, num_segments, segment_begin,
                                              segment_end, pages_per_chunk, page_bytes, &block_index, &segment);
        unsigned char* dst = reinterpret_cast<unsigned char*>(dst_ptrs[segment]) +
                             block_ids[block_index] * row_strides[segment];
        copy_page(dst, chunks + offset, page_bytes, vector != 0);
    }
}

// Whole-block copies for Store.put / Store.get: block i moves from src_ptrs[i] to dst_ptrs[i], nbytes each
// (arena slots in mapped host memory on one side, the caller's device tensors on the other). Each block
// is cut into pieces of piece_bytes so that a few large blocks still spread over every CUDA block launched.
extern "C" __global__ void kvtier_copy_blocks(const unsigned long long* __restrict__ dst_ptrs,
                                              const unsigned long long* __restrict__ src_ptrs,
                                              long long num_blocks, long long nbytes, long long piece_bytes,
                                              int vector) {
    const long long pieces_per_block = (nbytes + piece_bytes - 1) / piece_bytes;
    const long long num_pieces = num_blocks * pieces_per_block;
    for (long long piece = blockIdx.x; piece < num_pieces; piece += gridDim.x) {
        const long long block = piece / pieces_per_block;
        const long long begin = (piece % pieces_per_block) * piece_bytes;
        const long long length = nbytes - begin < piece_bytes ? nbytes - begin : piece_bytes;
        copy_page(reinterpret_cast<unsigned char*>(dst_ptrs[block]) + begin,
                  reinterpret_cast<const unsigned char*>(src_ptrs[block]) + begin, length, vector != 0);
    }
}
