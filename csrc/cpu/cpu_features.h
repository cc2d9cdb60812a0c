// Run-time CPU feature detection and the ISA cap that tests use to reach the fallback paths.
#pragma once
#include <string>

namespace lmsqueeze {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx512_fp16 = false;
  bool amx_tile = false;
  bool amx_bf16 = false;
};

// What the CPU and the OS (XSAVE state enabled in XCR0) both support. Detected once.
const CpuFeatures& cpu_features();

// The highest instruction set the kernels may use: 0 generic C++, 1 AVX2+FMA, 2 AVX-512.
// Starts at the best the machine has; set_isa_cap can only lower it (tests reach fallbacks this way).
enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
Isa active_isa();
// name in {"generic", "avx2", "avx512"}; returns the previous cap's name.
std::string set_isa_cap(const std::string& name);
std::string isa_name(Isa isa);

// AMX-BF16 tiles usable by this process: the CPU has them (amx_tile, amx_bf16, AVX-512 for the rest of the
// kernel) and Linux granted the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once, on first call).
// Kernels use AMX only while the ISA cap is avx512. amx_why_not() is "" when usable, else the reason.
bool amx_usable();
std::string amx_why_not();

}  // namespace lmsqueeze
