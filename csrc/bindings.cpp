// The whole op surface of lmsqueeze._C, in one place.
#include <torch/extension.h>

#include "cpu/cpu_features.h"
#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lmsqueeze C++/CUDA kernels";

  m.def("cpu_features", []() {
    const auto& f = lmsqueeze::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_fp16"] = f.avx512_fp16;
    d["amx_tile"] = f.amx_tile;
    d["amx_bf16"] = f.amx_bf16;
    d["amx_usable"] = lmsqueeze::amx_usable();  // the above, plus Linux's permission for tile data
    return d;
  }, "CPU features usable by this process (CPU flag and OS state both present)");
  m.def("active_isa", []() { return lmsqueeze::isa_name(lmsqueeze::active_isa()); },
        "the instruction set the CPU kernels use now: avx512, avx2 or generic");
  m.def("set_isa_cap", &lmsqueeze::set_isa_cap, py::arg("name"),
        "cap the CPU kernels' instruction set (generic, avx2, avx512); returns the previous cap");
  m.def("has_cuda", []() {
#ifdef LMSQUEEZE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether this build contains the CUDA kernels");

  m.def("col_sq_norm_update_cpu", &lmsqueeze::col_sq_norm_update_cpu, py::arg("s"), py::arg("x"),
        py::arg("nsamples"), py::arg("mask") = py::none());
  m.def("sparse24_matmul_cpu", &lmsqueeze::sparse24_matmul_cpu, py::arg("x"), py::arg("values"), py::arg("meta"),
        py::arg("bias") = py::none());
  m.def("hessian_update_cpu", &lmsqueeze::hessian_update_cpu, py::arg("H"), py::arg("x"), py::arg("nsamples"),
        py::arg("mask") = py::none());
  m.def("hessian_finalize_cpu", &lmsqueeze::hessian_finalize_cpu, py::arg("H"));
  m.def("hessian_update_tiles_emulated_cpu", &lmsqueeze::hessian_update_tiles_emulated_cpu, py::arg("H"), py::arg("x"),
        py::arg("nsamples"), py::arg("mask") = py::none(),
        "tests only: the AMX hessian_update path with its tile instructions emulated in scalar C++");
  m.def("hessian_update_cpu_path", &lmsqueeze::hessian_update_cpu_path, py::arg("dtype"),
        "the kernel hessian_update_cpu runs now for x of this dtype: amx, avx512-bf16 or fp32-gemm");
  m.def("amx_why_not", &lmsqueeze::amx_why_not, "why AMX tiles are not usable here ('' when they are)");
  m.def("rowwise_mask_cpu", &lmsqueeze::rowwise_mask_cpu, py::arg("scores"), py::arg("k"), py::arg("out") = py::none());
  m.def("nm_mask_cpu", &lmsqueeze::nm_mask_cpu, py::arg("scores"), py::arg("n"), py::arg("m"),
        py::arg("out") = py::none());
  m.def("wanda_mask_cpu", &lmsqueeze::wanda_mask_cpu, py::arg("W"), py::arg("col_sq_norm"), py::arg("k"),
        py::arg("n"), py::arg("m"), py::arg("out") = py::none());
  // ---- obs_update (issue 5) ----
  m.def("obs_update_cpu", &lmsqueeze::obs_update_cpu, py::arg("W"), py::arg("Hinv"), py::arg("blocksize"),
        py::arg("prune_counts"), py::arg("nm_n"), py::arg("nm_m"), py::arg("bits"), py::arg("group_size"),
        py::arg("sym"));
  // ---- end obs_update ----
  // ---- quant_matmul (issue 19) ----
  m.def("quant_matmul_cpu", &lmsqueeze::quant_matmul_cpu, py::arg("x"), py::arg("qweight"), py::arg("scales"),
        py::arg("zeros"), py::arg("perm"), py::arg("in_features"), py::arg("bits"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("act_int8") = false);
  m.def("sparse24_quant_matmul_cpu", &lmsqueeze::sparse24_quant_matmul_cpu, py::arg("x"), py::arg("qvalues"),
        py::arg("meta"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
        py::arg("bias") = py::none(), py::arg("act_int8") = false);
  // ---- end quant_matmul ----
#ifdef LMSQUEEZE_WITH_CUDA
  m.def("col_sq_norm_update_cuda", &lmsqueeze::col_sq_norm_update_cuda, py::arg("s"), py::arg("x"),
        py::arg("nsamples"), py::arg("mask") = py::none());
#endif
}
