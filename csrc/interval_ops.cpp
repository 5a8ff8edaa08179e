// Interval copies between flat 1-D buffers: the hot loop of parameter reallocation.
//
// copy_intervals(dst, dst_offsets, src, src_offsets, lengths) copies, for every i,
// src[src_offsets[i] : +lengths[i]] to dst[dst_offsets[i] : +lengths[i]] (offsets and lengths in
// elements, int64 CPU tensors). CPU tensors: memcpy per interval, spread over at::parallel_for
// threads (long intervals are cut into 1 MiB pieces so a few big ones still use every thread).
// CUDA tensors (built WITH_CUDA): one kernel launch, see interval_ops_cuda.cu.
// Python wrapper and pure-torch fallback: realflow/parallel/ops.py.

// Only the headers used (not torch/extension.h): the build takes a quarter of the time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef WITH_CUDA
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAStream.h>
extern "C" void realflow_copy_intervals_cuda(const void* src, void* dst, const int64_t* src_off,
                                             const int64_t* dst_off, const int64_t* len,
                                             int64_t n, int64_t max_len, int elem_size,
                                             cudaStream_t stream);
#endif

namespace {

constexpr int64_t kPieceBytes = int64_t{1} << 20;

struct Piece {
  const char* src;
  char* dst;
  int64_t nbytes;
};

void check_args(const at::Tensor& dst, const at::Tensor& dst_offsets,
                const at::Tensor& src, const at::Tensor& src_offsets,
                const at::Tensor& lengths) {
  TORCH_CHECK(dst.dim() == 1 && dst.is_contiguous(), "dst must be a contiguous 1-D tensor");
  TORCH_CHECK(src.dim() == 1 && src.is_contiguous(), "src must be a contiguous 1-D tensor");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "src and dst must share a dtype");
  TORCH_CHECK(dst.device() == src.device(), "src and dst must be on one device");
  for (const auto* t : {&dst_offsets, &src_offsets, &lengths}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->is_contiguous(),
                "offsets and lengths must be contiguous int64 1-D CPU tensors");
  }
  TORCH_CHECK(dst_offsets.numel() == lengths.numel() && src_offsets.numel() == lengths.numel(),
              "offsets and lengths must have one entry per interval");
  const int64_t n = lengths.numel();
  const int64_t* d = dst_offsets.data_ptr<int64_t>();
  const int64_t* s = src_offsets.data_ptr<int64_t>();
  const int64_t* l = lengths.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(l[i] >= 0 && d[i] >= 0 && s[i] >= 0 && d[i] + l[i] <= dst.numel() &&
                    s[i] + l[i] <= src.numel(),
                "interval ", i, " is outside a buffer");
  }
}

void copy_cpu(char* dst, const char* src, const int64_t* d, const int64_t* s, const int64_t* l,
              int64_t n, int64_t elem) {
  const int64_t threads = at::get_num_threads();
  if (n >= 4 * threads) {  // many intervals: split the list itself
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        std::memcpy(dst + d[i] * elem, src + s[i] * elem, l[i] * elem);
      }
    });
    return;
  }
  std::vector<Piece> pieces;  // few intervals: cut long ones so every thread gets work
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bytes = l[i] * elem;
    for (int64_t o = 0; o < bytes; o += kPieceBytes) {
      pieces.push_back({src + s[i] * elem + o, dst + d[i] * elem + o,
                        std::min(kPieceBytes, bytes - o)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].nbytes);
    }
  });
}

}  // namespace

void copy_intervals(at::Tensor dst, at::Tensor dst_offsets, at::Tensor src,
                    at::Tensor src_offsets, at::Tensor lengths) {
  check_args(dst, dst_offsets, src, src_offsets, lengths);
  const int64_t n = lengths.numel();
  if (n == 0) return;
  const int64_t elem = static_cast<int64_t>(dst.element_size());
  if (dst.device().is_cpu()) {
    copy_cpu(static_cast<char*>(dst.data_ptr()), static_cast<const char*>(src.data_ptr()),
             dst_offsets.data_ptr<int64_t>(), src_offsets.data_ptr<int64_t>(),
             lengths.data_ptr<int64_t>(), n, elem);
    return;
  }
#ifdef WITH_CUDA
  TORCH_CHECK(dst.device().is_cuda(), "copy_intervals supports CPU and CUDA tensors");
  TORCH_CHECK(elem == 1 || elem == 2 || elem == 4 || elem == 8,
              "the CUDA kernel copies elements of 1, 2, 4 or 8 bytes, got ", elem);
  const int64_t* l = lengths.data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(l, l + n);
  auto opts = at::TensorOptions().dtype(at::kLong).device(dst.device());
  auto table = at::stack({src_offsets, dst_offsets, lengths}).to(opts);
  realflow_copy_intervals_cuda(src.data_ptr(), dst.data_ptr(), table[0].data_ptr<int64_t>(),
                               table[1].data_ptr<int64_t>(), table[2].data_ptr<int64_t>(), n,
                               max_len, static_cast<int>(elem),
                               c10::cuda::getCurrentCUDAStream(dst.device().index()).stream());
#else
  TORCH_CHECK(false, "this build of realflow's interval ops has no CUDA kernel (built without nvcc)");
#endif
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "realflow interval copies for parameter reallocation (csrc/interval_ops.cpp)";
  m.def("copy_intervals", &copy_intervals, "dst[dst_off:+len] = src[src_off:+len] per interval",
        py::arg("dst"), py::arg("dst_offsets"), py::arg("src"), py::arg("src_offsets"),
        py::arg("lengths"));
  m.def("has_cuda", &has_cuda, "whether the CUDA kernel was compiled in");
}
