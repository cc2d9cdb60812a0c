#include "cpu/cpu_features.h"

#include <cerrno>
#include <cstring>
#include <stdexcept>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define LMSQUEEZE_X86 1
#endif

namespace lmsqueeze {

namespace {

#ifdef LMSQUEEZE_X86
unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef LMSQUEEZE_X86
  unsigned int a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  if (!osxsave) return f;
  const unsigned long long xcr0 = xgetbv0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;           // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;      // plus opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;   // XTILECFG and XTILEDATA
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = os_avx && (b & (1u << 5));
  f.fma = os_avx && fma;
  f.avx512f = os_avx512 && (b & (1u << 16));
  f.avx512bw = os_avx512 && (b & (1u << 30));
  f.avx512vl = os_avx512 && (b & (1u << 31));
  f.avx512_vnni = os_avx512 && (c & (1u << 11));
  f.avx512_fp16 = os_avx512 && (d & (1u << 23));
  f.amx_bf16 = os_amx && (d & (1u << 22));
  f.amx_tile = os_amx && (d & (1u << 24));
  unsigned int a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) f.avx512_bf16 = os_avx512 && (a1 & (1u << 5));
#endif
  return f;
}

Isa best_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl) return kAvx512;
  if (f.avx2 && f.fma) return kAvx2;
  return kGeneric;
}

Isa g_cap = best_isa();

struct AmxState {
  bool usable = false;
  std::string why;
};

// Linux keeps the 8 KiB tile data state (XTILEDATA, XSAVE component 18) disabled per process (XFD) until
// the process asks for it: without the request the first tile instruction raises SIGILL. Asked once;
// the permission then holds for every thread of the process (Linux 5.16+,
// Documentation/arch/x86/xstate.rst).
AmxState probe_amx() {
  AmxState s;
  const CpuFeatures& f = cpu_features();
  if (!f.amx_tile || !f.amx_bf16) {
    s.why = "the CPU (or the OS's XCR0) has no AMX-BF16 tiles";
    return s;
  }
  if (!(f.avx512f && f.avx512bw && f.avx512vl)) {
    s.why = "AMX without AVX-512F/BW/VL";
    return s;
  }
#if defined(LMSQUEEZE_X86) && defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM, arch/x86/include/uapi/asm/prctl.h
  constexpr long kXfeatureXtiledata = 18;     // XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    s.why = std::string("Linux refused the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM): ") + std::strerror(errno);
    return s;
  }
  s.usable = true;
#else
  s.why = "the tile data permission request (arch_prctl) is Linux/x86-64 only";
#endif
  return s;
}

const AmxState& amx_state() {
  static const AmxState s = probe_amx();
  return s;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

Isa active_isa() { return g_cap; }

bool amx_usable() { return amx_state().usable; }

std::string amx_why_not() { return amx_state().why; }

std::string isa_name(Isa isa) {
  switch (isa) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "generic";
  }
}

std::string set_isa_cap(const std::string& name) {
  Isa want;
  if (name == "generic") want = kGeneric;
  else if (name == "avx2") want = kAvx2;
  else if (name == "avx512") want = kAvx512;
  else throw std::invalid_argument("unknown ISA '" + name + "'; valid: generic, avx2, avx512");
  const std::string prev = isa_name(g_cap);
  const Isa best = best_isa();
  g_cap = want < best ? want : best;
  return prev;
}

}  // namespace lmsqueeze
