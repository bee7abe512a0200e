// Input checks of the extension's entry points: a direct caller of demul_fast._C gets an
// error naming the argument before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace demul {

inline bool is_kernel_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// A CUDA, contiguous tensor of `ndim` dimensions (`shape` names them in the message).
inline void check_input(const at::Tensor& t, const char* name, int64_t ndim, const char* shape) {
  TORCH_CHECK(t.defined(), name, " ", shape, " is required");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.dim() == ndim, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  for (int64_t i = 0; i < ndim; ++i) TORCH_CHECK(t.size(i) > 0, name, " must not be empty, got ", t.sizes());
}

// A kernel input: float32, bfloat16 or float16.
inline void check_features(const at::Tensor& t, const char* name, int64_t ndim, const char* shape) {
  check_input(t, name, ndim, shape);
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType s) {
  TORCH_CHECK(t.scalar_type() == s, name, " must be ", s, ", got ", t.scalar_type());
}

// Saved per-row statistics and float32 work tensors.
inline void check_f32(const at::Tensor& t, const char* name, int64_t ndim, const char* shape) {
  check_input(t, name, ndim, shape);
  check_dtype(t, name, at::kFloat);
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name, const char* what) {
  TORCH_CHECK(t.size(dim) == expected, name, " has ", what, "=", t.size(dim), ", expected ", expected);
}

// The logit multiplier: a 1-element float32 CUDA tensor, read by the kernels on the device.
inline void check_scale(const at::Tensor& scale, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(scale.defined() && scale.numel() == 1, "scale must be a 1-element tensor");
  TORCH_CHECK(scale.is_cuda(), "scale must be a CUDA tensor, got a tensor on ", scale.device());
  check_dtype(scale, "scale", at::kFloat);
  check_same_device(scale, "scale", ref, ref_name);
}

// Gradient weights of scalar losses: None or a 1-element float32 tensor on the device.
inline void check_grad_scalar(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& ref) {
  if (!g.has_value() || !g->defined()) return;
  TORCH_CHECK(g->numel() == 1, name, " must have one element, got ", g->sizes());
  TORCH_CHECK(g->is_cuda(), name, " must be a CUDA tensor, got a tensor on ", g->device());
  check_dtype(*g, name, at::kFloat);
  check_same_device(*g, name, ref, "text_features");
}

inline const float* opt_ptr(const std::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<float>() : nullptr;
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace demul
