// CUDA kernel of copy_intervals (see interval_ops.cpp). Plain CUDA, no torch headers, so it
// compiles with nvcc alone: `nvcc -c csrc/interval_ops_cuda.cu`.
//
// Grid: x = one interval per block column, y = blocks sharing one long interval. Elements are
// moved in units of the element size (1, 2, 4 or 8 bytes), which every offset is a multiple of.

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

template <typename T>
__global__ void copy_intervals_kernel(const T* __restrict__ src, T* __restrict__ dst,
                                      const int64_t* __restrict__ src_off,
                                      const int64_t* __restrict__ dst_off,
                                      const int64_t* __restrict__ len) {
  const int64_t i = blockIdx.x;
  const int64_t n = len[i];
  const T* s = src + src_off[i];
  T* d = dst + dst_off[i];
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.y;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; k < n;
       k += stride) {
    d[k] = s[k];
  }
}

template <typename T>
void launch(const void* src, void* dst, const int64_t* src_off, const int64_t* dst_off,
            const int64_t* len, int64_t n, int64_t max_len, cudaStream_t stream) {
  const int threads = 256;
  int64_t per_interval = (max_len + threads - 1) / threads;
  if (per_interval > 1024) per_interval = 1024;
  if (per_interval < 1) per_interval = 1;
  // gridDim.x may be up to 2^31 - 1: one launch covers any realistic interval count.
  dim3 grid(static_cast<unsigned int>(n), static_cast<unsigned int>(per_interval));
  copy_intervals_kernel<T><<<grid, threads, 0, stream>>>(
      static_cast<const T*>(src), static_cast<T*>(dst), src_off, dst_off, len);
}

}  // namespace

extern "C" void realflow_copy_intervals_cuda(const void* src, void* dst, const int64_t* src_off,
                                             const int64_t* dst_off, const int64_t* len,
                                             int64_t n, int64_t max_len, int elem_size,
                                             cudaStream_t stream) {
  if (n == 0) return;
  switch (elem_size) {
    case 1: launch<uint8_t>(src, dst, src_off, dst_off, len, n, max_len, stream); break;
    case 2: launch<uint16_t>(src, dst, src_off, dst_off, len, n, max_len, stream); break;
    case 4: launch<uint32_t>(src, dst, src_off, dst_off, len, n, max_len, stream); break;
    default: launch<uint64_t>(src, dst, src_off, dst_off, len, n, max_len, stream); break;
  }
}
