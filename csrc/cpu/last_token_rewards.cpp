// last_token_rewards: a scalar reward head applied only at each sequence's last real token.
//
//   index[s]  = max { t : mask[s, t] != 0 }                 (right / left padding, holes: all the same)
//   reward[s] = hidden[s, index[s], :] . weight + bias
// Forward reads each mask row from the end (stopping at the first real token) and one hidden row per
// sequence. Backward: dreward/dhidden is nonzero only on those rows, but autograd needs the gradient
// with hidden's full (.., T, H) shape, so it is written once (zeros elsewhere, huge pages); the weight
// gradient sum_s g[s] hidden[s, index[s], :] is parallel over H, each thread owning a slice (no
// reduction across threads, deterministic).
//
// Sequences are addressed as in a (outer, inner, T, H) view with any strides: s = o * inner + i
// (a (B, T, H) tensor is (B, 1, T, H); the ranked loss's (B, K, T, H) is itself).
#include <torch/library.h>

#include <cstring>

#include "errors.h"
#include "logistic.h"

namespace cai {
namespace {

struct SequenceLayout {
  int64_t inner, stride_outer, stride_inner;
  int64_t offset(int64_t s) const { return (s / inner) * stride_outer + (s % inner) * stride_inner; }
};

template <typename M>
void find_last_tokens(const M* mask, const SequenceLayout& seq, int64_t stride_t, int64_t n_seq, int64_t T,
                      const bool* active, int64_t* index, FirstBadRow& empty_row) {
  at::parallel_for(0, n_seq, std::max<int64_t>(1, 4096 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      int64_t last = -1;
      if (active == nullptr || active[s]) {
        const M* row = mask + seq.offset(s);
        for (int64_t t = T - 1; t >= 0; --t) {
          if (row[t * stride_t] != M(0)) {
            last = t;
            break;
          }
        }
        if (last < 0) empty_row.record(s);
      }
      index[s] = last;
    }
  });
}

// x[h * stride] . w[h] over h < H, in Acc; SIMD when the row is contiguous.
template <typename T, typename Acc>
Acc dot_row(const T* x, int64_t stride, const Acc* w, int64_t H) {
  Acc result = 0;
  int64_t h = 0;
  if constexpr (std::is_same_v<Acc, float>) {
    if (stride == 1) {
      Vec acc0(0.f), acc1(0.f);
      for (; h + kPair <= H; h += kPair) {
        Vec a, b;
        load_pair(x + h, a, b);
        acc0 = at::vec::fmadd(a, Vec::loadu(w + h), acc0);
        acc1 = at::vec::fmadd(b, Vec::loadu(w + h + Vec::size()), acc1);
      }
      result = vec_sum<float>(acc0 + acc1);
    }
  }
  for (; h < H; ++h) result += static_cast<Acc>(x[h * stride]) * w[h];
  return result;
}

// hidden: (outer, inner, T, H) any strides, fp32 / bf16 / fp16 / fp64; mask: (outer, inner, T) any
// strides, bool or integer; active: (N,) bool (N = outer * inner), or empty for all active: an inactive
// sequence gets reward 0 and index -1 and its mask is not read; weight: (H,) contiguous and bias (1,) or
// empty, both in the accumulation dtype. Returns (rewards (N,) fp32 / fp64, index (N,) int64).
// An active sequence without a real token is a ValueError naming mask_name (the caller's argument).
std::tuple<at::Tensor, at::Tensor> last_token_rewards_fwd(const at::Tensor& hidden, const at::Tensor& mask,
                                                          const at::Tensor& active, const at::Tensor& weight,
                                                          const at::Tensor& bias, c10::string_view mask_name) {
  TORCH_CHECK(hidden.dim() == 4 && mask.dim() == 3 && mask.size(0) == hidden.size(0) &&
                  mask.size(1) == hidden.size(1) && mask.size(2) == hidden.size(2),
              "hidden must be (outer, inner, T, H) and mask (outer, inner, T)");
  const int64_t inner = hidden.size(1), T = hidden.size(2), H = hidden.size(3), n_seq = hidden.size(0) * inner;
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H && weight.scalar_type() == acc,
              "weight must be (H,) contiguous in the accumulation dtype");
  TORCH_CHECK(bias.numel() <= 1 && (bias.numel() == 0 || bias.scalar_type() == acc), "bias must be (1,) or empty");
  TORCH_CHECK(active.numel() == 0 || (active.numel() == n_seq && active.is_contiguous() &&
                                      active.scalar_type() == at::kBool),
              "active must be empty or (N,) contiguous bool");
  at::Tensor rewards = at::empty({n_seq}, hidden.options().dtype(acc));
  at::Tensor index = at::empty({n_seq}, hidden.options().dtype(at::kLong));
  int64_t* index_data = index.data_ptr<int64_t>();
  const bool* active_data = active.numel() ? active.const_data_ptr<bool>() : nullptr;
  FirstBadRow empty_row;
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, mask.scalar_type(), "last_token_rewards_mask", [&] {
    const SequenceLayout seq{inner, mask.stride(0), mask.stride(1)};
    find_last_tokens(mask.const_data_ptr<scalar_t>(), seq, mask.stride(2), n_seq, T, active_data, index_data,
                     empty_row);
  });
  const int64_t bad = empty_row.get();
  CAI_CHECK_VALUE(bad < 0, mask_name, ": every sequence needs at least one real token (mask != 0); sequence ", bad,
                    " (row ", bad / inner, inner > 1 ? ", response " + std::to_string(bad % inner) : std::string(),
                    ") has none");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "last_token_rewards_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SequenceLayout seq{inner, hidden.stride(0), hidden.stride(1)};
    const scalar_t* base = hidden.const_data_ptr<scalar_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    const acc_t b = bias.numel() ? bias.const_data_ptr<acc_t>()[0] : acc_t(0);
    acc_t* out = rewards.data_ptr<acc_t>();
    const int64_t stride_t = hidden.stride(2), stride_h = hidden.stride(3);
    at::parallel_for(0, n_seq, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t t = index_data[s];
        out[s] = t < 0 ? acc_t(0) : dot_row(base + seq.offset(s) + t * stride_t, stride_h, w, H) + b;
      }
    });
  });
  return {rewards, index};
}

// Gradients of last_token_rewards_fwd for the upstream gradient grad_rewards (N,): hidden's
// (outer, inner, T, H) contiguous gradient in its dtype (empty unless need_hidden), the weight's (H,)
// and the bias's (1,) in the accumulation dtype (empty unless need_weight). Sequences with index -1
// (inactive) contribute nothing.
std::tuple<at::Tensor, at::Tensor, at::Tensor> last_token_rewards_bwd(const at::Tensor& grad_rewards,
                                                                      const at::Tensor& hidden, const at::Tensor& index,
                                                                      const at::Tensor& weight, bool need_hidden,
                                                                      bool need_weight) {
  TORCH_CHECK(hidden.dim() == 4, "hidden must be (outer, inner, T, H)");
  const int64_t inner = hidden.size(1), T = hidden.size(2), H = hidden.size(3), n_seq = hidden.size(0) * inner;
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_rewards.is_contiguous() && grad_rewards.numel() == n_seq && grad_rewards.scalar_type() == acc,
              "grad_rewards must be (N,) contiguous in the accumulation dtype");
  TORCH_CHECK(index.is_contiguous() && index.numel() == n_seq && index.scalar_type() == at::kLong,
              "index must be (N,) contiguous int64");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H && weight.scalar_type() == acc,
              "weight must be (H,) contiguous in the accumulation dtype");
  at::Tensor grad_hidden = need_hidden ? empty_huge_pages(hidden.sizes(), hidden.options()) : hidden.new_empty({0});
  at::Tensor grad_weight = at::empty({need_weight ? H : 0}, weight.options());
  at::Tensor grad_bias = at::empty({need_weight ? 1 : 0}, weight.options());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "last_token_rewards_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* g = grad_rewards.const_data_ptr<acc_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    if (need_hidden) {
      scalar_t* out = grad_hidden.data_ptr<scalar_t>();
      at::parallel_for(0, n_seq * T, row_grain(H), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t s = row / T, t = row % T;
          scalar_t* out_row = out + row * H;
          if (t != idx[s]) {
            std::memset(out_row, 0, H * sizeof(scalar_t));  // all-zero bits are 0 in every float type
            continue;
          }
          for (int64_t h = 0; h < H; ++h) out_row[h] = static_cast<scalar_t>(g[s] * w[h]);
        }
      });
    }
    if (need_weight) {
      const SequenceLayout seq{inner, hidden.stride(0), hidden.stride(1)};
      const scalar_t* base = hidden.const_data_ptr<scalar_t>();
      const int64_t stride_t = hidden.stride(2), stride_h = hidden.stride(3);
      acc_t* gw = grad_weight.data_ptr<acc_t>();
      at::parallel_for(0, H, 256, [&](int64_t h0, int64_t h1) {
        std::fill(gw + h0, gw + h1, acc_t(0));
        for (int64_t s = 0; s < n_seq; ++s) {
          if (idx[s] < 0) continue;
          const scalar_t* x = base + seq.offset(s) + idx[s] * stride_t;
          for (int64_t h = h0; h < h1; ++h) gw[h] += g[s] * static_cast<acc_t>(x[h * stride_h]);
        }
      });
      double bias_total = 0.0;
      for (int64_t s = 0; s < n_seq; ++s) bias_total += idx[s] < 0 ? 0.0 : static_cast<double>(g[s]);
      grad_bias.fill_(bias_total);
    }
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("last_token_rewards_fwd(Tensor hidden, Tensor mask, Tensor active, Tensor weight, Tensor bias, "
        "str mask_name) -> (Tensor, Tensor)");
  m.def("last_token_rewards_bwd(Tensor grad_rewards, Tensor hidden, Tensor index, Tensor weight, bool need_hidden, "
        "bool need_weight) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("last_token_rewards_fwd", &cai::last_token_rewards_fwd);
  m.impl("last_token_rewards_bwd", &cai::last_token_rewards_bwd);
}
