// CPU implementations of the torch.ops.minillm_fast.* schemas (defined in minillm_fast/_library.py): input checks,
// dtype dispatch and output allocation only; the computation is in the kernel files (kernels.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"

namespace {

using minillm::bf16;
using minillm::fp16;
using minillm::cpu::NUM_COEFS;
using minillm::cpu::NUM_STATS;
using minillm::cpu::Rows;

// Logits with a unit stride along the vocabulary are used in place (any row stride); anything else is copied.
at::Tensor unit_stride(const at::Tensor& x) {
  return (x.size(1) <= 1 || x.stride(1) == 1) && x.stride(0) >= 0 ? x : x.contiguous();
}

// float32 [N, V] logits stored vocabulary-major: a row-major [V, ld] buffer (ld >= N) seen through a transpose, as
// the fused-linear ops form a block's logits (W h^T). row_stats and logits_grad read them in place
// (vocab_major_kernels.cpp); the other ops copy them to unit stride.
// Readable as vocabulary-major: entry (r, v) at data[v * stride(1) + r] (a single row with any column stride too).
bool readable_by_vocab(const at::Tensor& x) {
  return x.dim() == 2 && x.scalar_type() == at::kFloat && (x.size(0) <= 1 || x.stride(0) == 1) &&
         x.stride(1) >= std::max<int64_t>(1, x.size(0));
}

// Vocabulary-major proper: the row-major kernels would need a copy.
bool vocab_major(const at::Tensor& x) {
  return readable_by_vocab(x) && x.size(1) > 1 && x.stride(1) != 1;
}

// Whether row_stats / logits_grad read z and u vocabulary-major (and logits_grad writes dz so): where one of them is
// and the other can be read so too.
bool by_vocab(const at::Tensor& z, const at::Tensor& u) {
  return (vocab_major(z) || vocab_major(u)) && readable_by_vocab(z) && readable_by_vocab(u);
}

minillm::cpu::VocabMajor vocab_major_of(const at::Tensor& x) {
  return {x.data_ptr<float>(), x.stride(1)};
}

bool is_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_logits(const char* op, const at::Tensor& z, const at::Tensor& u) {
  TORCH_CHECK(z.dim() == 2 && u.dim() == 2, op, ": expected 2-D [N, V] student and teacher logits, got shapes ",
              z.sizes(), " and ", u.sizes());
  TORCH_CHECK(z.size(0) == u.size(0), op, ": student and teacher logits must have the same number of rows, got ",
              z.size(0), " and ", u.size(0));
  TORCH_CHECK(z.device().is_cpu() && u.device().is_cpu(), op, ": expected CPU tensors, got ", z.device(), " and ",
              u.device());
  TORCH_CHECK(is_logits_dtype(z.scalar_type()) && is_logits_dtype(u.scalar_type()), op,
              ": logits must be float32, bfloat16 or float16, got ", z.scalar_type(), " and ", u.scalar_type());
}

void check_inv_temp(const char* op, double inv_temp) {
  TORCH_CHECK(std::isfinite(inv_temp) && inv_temp > 0.0, op, ": inv_temp must be finite and > 0, got ", inv_temp);
}

void check_beta(const char* op, double beta) {
  TORCH_CHECK(beta > 0.0 && beta < 1.0, op, ": beta must lie in (0, 1), got ", beta);
}

// A per-row parameter: a CPU tensor of the given dtype and shape [n_rows] (width 0) or [n_rows, width], made
// contiguous.
at::Tensor rows_param(const char* op, const char* name, const at::Tensor& t, int64_t n_rows, int64_t width,
                      at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  const bool shape_ok = width == 0 ? (t.dim() == 1 && t.size(0) == n_rows)
                                   : (t.dim() == 2 && t.size(0) == n_rows && t.size(1) == width);
  TORCH_CHECK(shape_ok, op, ": ", name, " must have shape [", n_rows, width == 0 ? "" : ", ",
              width == 0 ? "" : std::to_string(width), "], got ", t.sizes());
  return t.contiguous();
}

// tokens: int64 [N] with every entry in [0, vocab); returned contiguous (or undefined when absent).
at::Tensor checked_tokens(const char* op, const std::optional<at::Tensor>& tokens, int64_t n_rows, int64_t vocab) {
  if (!tokens.has_value() || !tokens->defined()) return at::Tensor();
  at::Tensor t = rows_param(op, "tokens", *tokens, n_rows, 0, at::kLong);
  const int64_t* y = t.data_ptr<int64_t>();
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(y[r] >= 0 && y[r] < vocab, op, ": tokens[", r, "] = ", y[r], " is outside the vocabulary [0, ",
                vocab, ")");
  }
  return t;
}

// A gradient output is written once, in full, by the kernel. On a VM every first touch of a 4 KiB page is an
// expensive fault (measured here: ~2 ns per float32 element, more than the kernel's own work), so large outputs ask
// for transparent huge pages before the kernel touches them, as torch itself does for every allocation under
// THP_MEM_ALLOC_ENABLE=1. Only a hint: the kernel may ignore it. MINILLM_FAST_NO_HUGEPAGES=1 turns it off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = std::getenv("MINILLM_FAST_NO_HUGEPAGES") == nullptr;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (!enabled || t.nbytes() < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

template <class T>
struct Tag {
  using type = T;
};

template <class F>
void dispatch_pair(at::ScalarType zt, at::ScalarType ut, F&& f) {
  auto with_u = [&](auto z_tag) {
    switch (ut) {
      case at::kFloat: return f(z_tag, Tag<float>{});
      case at::kBFloat16: return f(z_tag, Tag<bf16>{});
      case at::kHalf: return f(z_tag, Tag<fp16>{});
      default: TORCH_CHECK(false, "minillm_fast: unsupported teacher dtype ", ut);
    }
  };
  switch (zt) {
    case at::kFloat: return with_u(Tag<float>{});
    case at::kBFloat16: return with_u(Tag<bf16>{});
    case at::kHalf: return with_u(Tag<fp16>{});
    default: TORCH_CHECK(false, "minillm_fast: unsupported student dtype ", zt);
  }
}

template <class T>
Rows<T> rows_of(const at::Tensor& x) {
  return Rows<T>{reinterpret_cast<const T*>(x.data_ptr()), x.stride(0)};
}

at::Tensor row_stats_cpu(const at::Tensor& z_in, const at::Tensor& u_in, const std::optional<at::Tensor>& tokens_in,
                         double inv_temp) {
  check_logits("row_stats", z_in, u_in);
  check_inv_temp("row_stats", inv_temp);
  const bool vocab_first = by_vocab(z_in, u_in);
  const at::Tensor z = vocab_first ? z_in : unit_stride(z_in), u = vocab_first ? u_in : unit_stride(u_in);
  const int64_t n_rows = z.size(0), vocab = std::min(z.size(1), u.size(1));
  const at::Tensor tokens = checked_tokens("row_stats", tokens_in, n_rows, vocab);
  at::Tensor out = at::empty({n_rows, NUM_STATS}, z.options().dtype(at::kFloat));
  if (n_rows == 0) return out;
  if (vocab_first) {
    minillm::cpu::row_stats_vocab_major(vocab_major_of(z), vocab_major_of(u), n_rows, vocab,
                                        tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr,
                                        static_cast<float>(inv_temp), out.data_ptr<float>());
    return out;
  }
  dispatch_pair(z.scalar_type(), u.scalar_type(), [&](auto zt, auto ut) {
    using TZ = typename decltype(zt)::type;
    using TU = typename decltype(ut)::type;
    minillm::cpu::row_stats<TZ, TU>(rows_of<TZ>(z), rows_of<TU>(u), n_rows, vocab,
                                    tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr,
                                    static_cast<float>(inv_temp), out.data_ptr<float>());
  });
  return out;
}

// dz = logits_grad(z, u, ...) written into `dz` ([n_rows, z.size(1)], z's dtype; vocabulary-major where
// by_vocab(z, u), else contiguous); dz may be z itself: every element is read before it is written.
void logits_grad_into(const char* op, const at::Tensor& z_in, const at::Tensor& u_in,
                      const std::optional<at::Tensor>& tokens_in, const at::Tensor& stats_in,
                      const at::Tensor& coef_in, double inv_temp, at::Tensor& dz) {
  check_logits(op, z_in, u_in);
  check_inv_temp(op, inv_temp);
  const bool vocab_first = by_vocab(z_in, u_in);
  const at::Tensor z = vocab_first ? z_in : unit_stride(z_in), u = vocab_first ? u_in : unit_stride(u_in);
  const int64_t n_rows = z.size(0), vocab = std::min(z.size(1), u.size(1));
  const at::Tensor tokens = checked_tokens(op, tokens_in, n_rows, vocab);
  const at::Tensor stats = rows_param(op, "stats", stats_in, n_rows, NUM_STATS, at::kFloat);
  const at::Tensor coef = rows_param(op, "coef", coef_in, n_rows, NUM_COEFS, at::kFloat);
  if (vocab_first) {
    minillm::cpu::logits_grad_vocab_major(vocab_major_of(z), vocab_major_of(u), n_rows, vocab,
                                          tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr,
                                          stats.data_ptr<float>(), coef.data_ptr<float>(),
                                          static_cast<float>(inv_temp), dz.data_ptr<float>(), dz.stride(1),
                                          z.size(1));
    return;
  }
  dispatch_pair(z.scalar_type(), u.scalar_type(), [&](auto zt, auto ut) {
    using TZ = typename decltype(zt)::type;
    using TU = typename decltype(ut)::type;
    minillm::cpu::logits_grad<TZ, TU>(rows_of<TZ>(z), rows_of<TU>(u), n_rows, vocab,
                                      tokens.defined() ? tokens.data_ptr<int64_t>() : nullptr,
                                      stats.data_ptr<float>(), coef.data_ptr<float>(), static_cast<float>(inv_temp),
                                      reinterpret_cast<TZ*>(dz.data_ptr()), z.size(1));
  });
}

at::Tensor logits_grad_cpu(const at::Tensor& z, const at::Tensor& u, const std::optional<at::Tensor>& tokens,
                           const at::Tensor& stats, const at::Tensor& coef, double inv_temp) {
  at::Tensor dz = by_vocab(z, u) ? at::empty({z.size(1), z.size(0)}, z.options()).t()
                                      : at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(dz);
  logits_grad_into("logits_grad", z, u, tokens, stats, coef, inv_temp, dz);
  return dz;
}

// In place: z receives its own gradient (saves a [N, V] buffer where z is a scratch copy, as in the fused-linear ops).
void logits_grad_inplace_cpu(at::Tensor z, const at::Tensor& u, const std::optional<at::Tensor>& tokens,
                             const at::Tensor& stats, const at::Tensor& coef, double inv_temp) {
  TORCH_CHECK(z.dim() == 2 && (z.is_contiguous() || vocab_major(z)), "logits_grad_: z must be a contiguous 2-D "
              "tensor or float32 vocabulary-major (a transposed [V, ld] buffer): it receives the gradient in place; "
              "got sizes ", z.sizes(), " and strides ", z.strides());
  // Vocabulary-major z is written by the vocabulary-major kernel, which needs u readable so too.
  const bool copy_u = vocab_major(z) && !readable_by_vocab(u);
  logits_grad_into("logits_grad_", z, copy_u ? u.t().contiguous().t() : u, tokens, stats, coef, inv_temp, z);
}

at::Tensor jsd_rows_cpu(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& stats_in, double beta,
                        double inv_temp) {
  check_logits("jsd_rows", z_in, u_in);
  check_inv_temp("jsd_rows", inv_temp);
  check_beta("jsd_rows", beta);
  const at::Tensor z = unit_stride(z_in), u = unit_stride(u_in);
  const int64_t n_rows = z.size(0), vocab = std::min(z.size(1), u.size(1));
  const at::Tensor stats = rows_param("jsd_rows", "stats", stats_in, n_rows, NUM_STATS, at::kFloat);
  at::Tensor out = at::empty({n_rows, 2}, z.options().dtype(at::kFloat));
  if (n_rows == 0) return out;
  dispatch_pair(z.scalar_type(), u.scalar_type(), [&](auto zt, auto ut) {
    using TZ = typename decltype(zt)::type;
    using TU = typename decltype(ut)::type;
    minillm::cpu::jsd_rows<TZ, TU>(rows_of<TZ>(z), rows_of<TU>(u), n_rows, vocab, stats.data_ptr<float>(), beta,
                                   static_cast<float>(inv_temp), out.data_ptr<float>());
  });
  return out;
}

at::Tensor jsd_grad_cpu(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& stats_in,
                        const at::Tensor& jsd_in, const at::Tensor& coef_in, double beta, double inv_temp) {
  check_logits("jsd_grad", z_in, u_in);
  check_inv_temp("jsd_grad", inv_temp);
  check_beta("jsd_grad", beta);
  const at::Tensor z = unit_stride(z_in), u = unit_stride(u_in);
  const int64_t n_rows = z.size(0), vocab = std::min(z.size(1), u.size(1));
  const at::Tensor stats = rows_param("jsd_grad", "stats", stats_in, n_rows, NUM_STATS, at::kFloat);
  const at::Tensor jsd = rows_param("jsd_grad", "jsd", jsd_in, n_rows, 2, at::kFloat);
  const at::Tensor coef = rows_param("jsd_grad", "coef", coef_in.dim() == 2 && coef_in.size(1) == 1
                                                             ? coef_in.reshape({-1}) : coef_in,
                                     n_rows, 0, at::kFloat);
  at::Tensor dz = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(dz);
  dispatch_pair(z.scalar_type(), u.scalar_type(), [&](auto zt, auto ut) {
    using TZ = typename decltype(zt)::type;
    using TU = typename decltype(ut)::type;
    minillm::cpu::jsd_grad<TZ, TU>(rows_of<TZ>(z), rows_of<TU>(u), n_rows, vocab, stats.data_ptr<float>(),
                                   jsd.data_ptr<float>(), coef.data_ptr<float>(), beta, static_cast<float>(inv_temp),
                                   reinterpret_cast<TZ*>(dz.data_ptr()), z.size(1));
  });
  return dz;
}

at::Tensor sample_rows_cpu(const at::Tensor& z_in, const at::Tensor& u_in, const at::Tensor& use_teacher_in,
                           const at::Tensor& uniform_in, double inv_temp) {
  check_logits("sample_rows", z_in, u_in);
  check_inv_temp("sample_rows", inv_temp);
  const at::Tensor z = unit_stride(z_in), u = unit_stride(u_in);
  const int64_t n_rows = z.size(0), vocab = std::min(z.size(1), u.size(1));
  const at::Tensor use_teacher = rows_param("sample_rows", "use_teacher", use_teacher_in, n_rows, 0, at::kBool);
  const at::Tensor uniform = rows_param("sample_rows", "uniform", uniform_in, n_rows, 0, at::kDouble);
  at::Tensor out = at::empty({n_rows}, z.options().dtype(at::kLong));
  if (n_rows == 0) return out;
  dispatch_pair(z.scalar_type(), u.scalar_type(), [&](auto zt, auto ut) {
    using TZ = typename decltype(zt)::type;
    using TU = typename decltype(ut)::type;
    minillm::cpu::sample_rows<TZ, TU>(rows_of<TZ>(z), rows_of<TU>(u), n_rows, vocab, use_teacher.data_ptr<bool>(),
                                      uniform.data_ptr<double>(), static_cast<float>(inv_temp),
                                      out.data_ptr<int64_t>());
  });
  return out;
}

void advise_huge_pages_cpu(at::Tensor x) { advise_huge_pages(x); }

}  // namespace

TORCH_LIBRARY_IMPL(minillm_fast, CPU, m) {
  m.impl("row_stats", &row_stats_cpu);
  m.impl("logits_grad", &logits_grad_cpu);
  m.impl("logits_grad_", &logits_grad_inplace_cpu);
  m.impl("jsd_rows", &jsd_rows_cpu);
  m.impl("jsd_grad", &jsd_grad_cpu);
  m.impl("sample_rows", &sample_rows_cpu);
  m.impl("advise_huge_pages_", &advise_huge_pages_cpu);
}
