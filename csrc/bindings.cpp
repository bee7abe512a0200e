// Python bindings of the demul_fast._C extension.
#include <torch/extension.h>
#include <cuda.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "demul_fast CUDA kernels";
  m.def("compiled_with", []() { return std::string("CUDA ") + std::to_string(CUDA_VERSION); },
        "CUDA toolkit version the extension was compiled with");
}
