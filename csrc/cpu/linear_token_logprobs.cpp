// linear_token_logprobs: log p(target) (and the entropy) of softmax((hidden @ weight^T + bias) / T) per
// row, without ever materializing the [rows, V] logits.
//
// The vocabulary is cut into blocks of `vocab_block` rows of the weight, the tokens into chunks of
// `token_chunk` rows of hidden. For each (vocab block, token chunk) one GEMM (ATen, i.e. BLAS) writes
// the logits block into a preallocated fp32 scratch; our SIMD row code (softmax_rows.h) then folds it
// into the rows' online log-sum-exp (forward), or turns it in place into dL/dlogits, from which two
// more GEMMs give that block's share of grad_hidden and grad_weight (backward, which recomputes the
// block from the saved per-row lse).
//
// Threads work on whole vocabulary blocks (one parallel region per pass, single-threaded GEMMs
// inside it), handed out in order as threads come free. Each weight block is read from memory (and
// converted to fp32) once per pass, and its gradient is complete when the block is done, so a 16-bit
// grad_weight needs an fp32 accumulator for one block, rounded once. What blocks add into shared
// per-row results (the log-sum-exp statistics, grad_hidden) is committed in block order, so the
// results are bitwise the same for any number of threads and any scheduling. On a shared machine a
// descheduled thread holds up the others only at those short commits, not at a barrier inside
// every GEMM and row loop, which is what a multi-threaded BLAS call per block costs.
//
// Extra memory, in fp32 (fp64 for fp64 inputs) elements, per worker thread:
//   token_chunk * vocab_block                    the logits block
//   + token_chunk * H                            its share of grad_hidden, before the commit
//   + 2 * vocab_block * H                        a 16-bit weight block and its gradient accumulator
// and once: rows * H for hidden as an fp32 matrix (16-bit hidden, or a view the GEMM cannot read
// in place) and for the grad_hidden accumulator (16-bit hidden); never rows * V.
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

#include "softmax_rows.h"
#include "targets.h"

namespace cai {
namespace {

// One row of hidden (or any row-contiguous input) converted to the accumulation type.
template <typename T, typename Acc>
inline void convert_row(const T* src, Acc* dst, int64_t n) {
  if constexpr (std::is_same_v<T, Acc>) {
    std::copy(src, src + n, dst);
  } else {
    int64_t i = 0;
    for (; i + kPair <= n; i += kPair) {
      Vec a, b;
      load_pair(src + i, a, b);
      a.store(dst + i);
      b.store(dst + i + Vec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<Acc>(src[i]);
  }
}

// The operands of one call. hidden becomes one (rows, H) matrix of the accumulation type the GEMMs
// read: a view when it already is one, else converted once per pass (shared by all threads).
template <typename T>
struct LinearOperands {
  using Acc = typename Accumulate<T>::type;

  at::Tensor hidden_matrix;  // (rows, H) of Acc
  at::Tensor weight;         // (V, H), any strides
  at::Tensor bias;           // (V,) or undefined
  int64_t rows, H, V;
  at::TensorOptions acc_options;

  LinearOperands(const at::Tensor& hidden, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_)
      : weight(weight_), bias(bias_.has_value() ? *bias_ : at::Tensor()), rows(hidden.size(0) * hidden.size(1)),
        H(hidden.size(2)), V(weight_.size(0)),
        acc_options(hidden.options().dtype(c10::CppTypeToScalarType<Acc>::value)) {
    const RowLayout layout(hidden);
    const bool one_matrix = hidden.size(0) == 1 || layout.stride_outer == layout.inner * layout.stride_inner;
    if (std::is_same_v<T, Acc> && one_matrix) {
      hidden_matrix = hidden.reshape({rows, H});  // a view under this condition
      return;
    }
    hidden_matrix = at::empty({rows, H}, acc_options);
    const T* base = hidden.const_data_ptr<T>();
    Acc* dst = hidden_matrix.data_ptr<Acc>();
    at::parallel_for(0, rows, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) convert_row(base + layout.offset(r), dst + r * H, H);
    });
  }

  int64_t num_chunks(int64_t token_chunk) const { return (rows + token_chunk - 1) / token_chunk; }
};

// A worker's fp32 (fp64) views of one vocabulary block of the weight and bias, and its logits
// scratch: in place for fp32 / fp64 inputs, converted into the worker's own buffers for 16-bit.
template <typename T>
struct BlockOperands {
  using Acc = typename Accumulate<T>::type;
  at::Tensor logits_scratch, weight_scratch, bias_scratch;

  BlockOperands(const LinearOperands<T>& ops, int64_t vocab_block, int64_t token_chunk) {
    const int64_t max_block = std::min(vocab_block, ops.V);
    logits_scratch = at::empty({std::min(token_chunk, ops.rows) * max_block}, ops.acc_options);
    if (!std::is_same_v<T, Acc>) {
      weight_scratch = at::empty({max_block * ops.H}, ops.acc_options);
      if (ops.bias.defined()) bias_scratch = at::empty({max_block}, ops.acc_options);
    }
  }

  std::pair<at::Tensor, at::Tensor> weight_and_bias(const LinearOperands<T>& ops, int64_t v0, int64_t n) {
    at::Tensor weight_block = ops.weight.narrow(0, v0, n);
    at::Tensor bias_block = ops.bias.defined() ? ops.bias.narrow(0, v0, n) : at::Tensor();
    if (weight_scratch.defined()) {
      weight_block = weight_scratch.narrow(0, 0, n * ops.H).view({n, ops.H}).copy_(weight_block);
      if (bias_block.defined()) bias_block = bias_scratch.narrow(0, 0, n).copy_(bias_block);
    }
    return {weight_block, bias_block};
  }

  // logits (n, vb) = hidden_chunk @ weight_block^T (+ bias_block), into the scratch.
  at::Tensor logits(const at::Tensor& hidden_chunk, const at::Tensor& weight_block, const at::Tensor& bias_block) {
    at::Tensor out = logits_scratch.narrow(0, 0, hidden_chunk.size(0) * weight_block.size(0))
                         .view({hidden_chunk.size(0), weight_block.size(0)});
    if (bias_block.defined()) {
      at::addmm_out(out, bias_block, hidden_chunk, weight_block.t());
    } else {
      at::mm_out(out, hidden_chunk, weight_block.t());
    }
    return out;
  }
};

// Runs body(worker, v0, vb) for every vocabulary block on up to at::get_num_threads() workers, and
// lets bodies commit to shared results in a fixed order: commit(ticket, fn) waits until every
// ticket below `ticket` has committed, runs fn, and releases the next. Tickets are numbered
// block-major (block * commits_per_block + k), so committing is deterministic whatever the
// scheduling. A body that throws releases everyone waiting; the first error is rethrown.
class OrderedBlocks {
 public:
  OrderedBlocks(int64_t V, int64_t vocab_block)
      : V_(V), vocab_block_(vocab_block), num_blocks_((V + vocab_block - 1) / vocab_block) {}

  int64_t num_workers() const { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_blocks_)); }

  template <typename Body>
  void run(const Body& body) {
    at::parallel_for(0, num_workers(), 1, [&](int64_t begin, int64_t end) {
      at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
      for (int64_t worker = begin; worker < end; ++worker) {
        try {
          for (int64_t b; (b = next_block_.fetch_add(1)) < num_blocks_;) {
            const int64_t v0 = b * vocab_block_;
            body(worker, b, v0, std::min(vocab_block_, V_ - v0));
          }
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex_);
          failed_ = true;
          cv_.notify_all();
          throw;  // at::parallel_for rethrows the first exception on the calling thread
        }
      }
    });
  }

  template <typename Fn>
  void commit(int64_t ticket, const Fn& fn) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return next_commit_ == ticket || failed_; });
    TORCH_CHECK(!failed_, "linear_token_logprobs: another worker failed");
    lock.unlock();
    fn();  // alone: every other commit is waiting for this ticket
    lock.lock();
    ++next_commit_;
    cv_.notify_all();
  }

 private:
  const int64_t V_, vocab_block_, num_blocks_;
  std::atomic<int64_t> next_block_{0};
  int64_t next_commit_ = 0;
  bool failed_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
};

struct Blocking {
  int64_t vocab_block, token_chunk;
};

// Folds a logits block (rows r0.., vocabulary v0..) into fresh per-row statistics of this block, and
// picks up the target's logit when it falls in this block.
template <bool kEntropy, typename Acc, typename Softmax>
void fold_block(const Acc* block, int64_t n, int64_t vb, int64_t r0, int64_t v0, const int64_t* targets,
                const IgnoreIndex& ignored, Acc inv_t, Softmax* block_stats, Acc* target_logit) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i, t = targets[r];
    block_stats[i] = Softmax();
    if (ignored(t)) continue;
    const Acc* row = block + i * vb;
    block_stats[i].template update<kEntropy>(row, vb, inv_t);
    if (t >= v0 && t < v0 + vb) target_logit[r] = row[t - v0];  // one block holds it: no race
  }
}

template <bool kEntropy, typename T>
void forward_impl(const LinearOperands<T>& ops, const Blocking& blocking, const int64_t* targets,
                  typename Accumulate<T>::type inv_t, const IgnoreIndex& ignored, at::Tensor& logp,
                  at::Tensor& entropy, at::Tensor& lse) {
  using Acc = typename Accumulate<T>::type;
  using Softmax = typename Accumulate<T>::softmax;
  const int64_t rows = ops.rows, chunk_rows = std::min(blocking.token_chunk, rows);
  const int64_t num_chunks = ops.num_chunks(chunk_rows);
  std::vector<Softmax> stats(rows);
  std::vector<Acc> target_logit(rows, Acc(0));
  OrderedBlocks blocks(ops.V, blocking.vocab_block);
  std::vector<std::optional<BlockOperands<T>>> workers(blocks.num_workers());
  std::vector<std::vector<Softmax>> block_stats(workers.size());
  blocks.run([&](int64_t worker, int64_t b, int64_t v0, int64_t vb) {
    if (!workers[worker]) {
      workers[worker].emplace(ops, blocking.vocab_block, blocking.token_chunk);
      block_stats[worker].resize(chunk_rows);
    }
    auto [weight_block, bias_block] = workers[worker]->weight_and_bias(ops, v0, vb);
    Softmax* local = block_stats[worker].data();
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t r0 = c * chunk_rows, n = std::min(chunk_rows, rows - r0);
      const at::Tensor logits = workers[worker]->logits(ops.hidden_matrix.narrow(0, r0, n), weight_block, bias_block);
      fold_block<kEntropy>(logits.const_data_ptr<Acc>(), n, vb, r0, v0, targets, ignored, inv_t,
                           local, target_logit.data());
      blocks.commit(b * num_chunks + c, [&] {
        for (int64_t i = 0; i < n; ++i) stats[r0 + i].merge(local[i]);
      });
    }
  });
  Acc* logp_out = logp.data_ptr<Acc>();
  Acc* lse_out = lse.data_ptr<Acc>();
  Acc* entropy_out = kEntropy ? entropy.data_ptr<Acc>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    if (ignored(targets[r])) {
      logp_out[r] = lse_out[r] = Acc(0);
      if (kEntropy) entropy_out[r] = Acc(0);
      continue;
    }
    lse_out[r] = stats[r].lse();
    logp_out[r] = scaled(target_logit[r], inv_t) - lse_out[r];
    if (kEntropy) entropy_out[r] = stats[r].entropy();
  }
}

void check_operands(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& targets, int64_t vocab_block, int64_t token_chunk) {
  TORCH_CHECK(hidden.dim() == 3 && hidden.stride(2) == 1, "hidden must be a (outer, inner, H) row-contiguous view");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(2) && weight.scalar_type() == hidden.scalar_type(),
              "weight must be (V, H) of hidden's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == hidden.scalar_type()),
              "bias must be (V,) of hidden's dtype");
  TORCH_CHECK(targets.is_contiguous() && targets.scalar_type() == at::kLong &&
                  targets.numel() == hidden.size(0) * hidden.size(1),
              "targets must be contiguous int64 with one entry per row");
  TORCH_CHECK(vocab_block > 0 && token_chunk > 0, "vocab_block and token_chunk must be positive");
}

// hidden: (outer, inner, H) with stride(2) == 1; weight (V, H) and bias (V,) of hidden's dtype;
// targets (rows,) int64; then the fields of LinearTokenLogprobsParams (cai_kernels/_params.py).
// Returns (logp, entropy, lse), each (rows,) fp32 (fp64 for fp64 inputs); entropy is empty without
// with_entropy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, std::optional<int64_t> ignore_index, bool with_entropy,
    int64_t vocab_block, int64_t token_chunk) {
  check_operands(hidden, weight, bias, targets, vocab_block, token_chunk);
  at::NoGradGuard no_grad;
  const int64_t rows = targets.numel();
  const IgnoreIndex ignored(ignore_index);
  check_targets_in_range(targets.const_data_ptr<int64_t>(), rows, weight.size(0), ignored);
  auto acc = hidden.options().dtype(hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({rows}, acc), lse = at::empty({rows}, acc);
  at::Tensor entropy = at::empty({with_entropy ? rows : 0}, acc);
  if (rows == 0) return {logp, entropy, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_fwd", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    const LinearOperands<scalar_t> ops(hidden, weight, bias);
    auto run = [&](auto entropy_tag) {
      forward_impl<decltype(entropy_tag)::value>(ops, Blocking{vocab_block, token_chunk},
                                                 targets.const_data_ptr<int64_t>(), static_cast<acc_t>(1.0 / temperature),
                                                 ignored, logp, entropy, lse);
    };
    with_entropy ? run(std::true_type{}) : run(std::false_type{});
  });
  return {logp, entropy, lse};
}

// Turns a logits block in place into dL/dlogits (with the 1/T of the temperature): the same row
// formula as token_logprobs' backward. Ignored rows and rows without upstream gradient become 0.
template <bool kEntropy, typename Acc>
void logits_grad_block(Acc* block, int64_t n, int64_t vb, int64_t r0, int64_t v0, const int64_t* targets,
                       const IgnoreIndex& ignored, Acc inv_t, const Acc* grad_logp,
                       const Acc* grad_entropy, const Acc* lse, const Acc* entropy) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = r0 + i, t = targets[r];
    Acc* row = block + i * vb;
    const Acc g = grad_logp[r], h = kEntropy ? grad_entropy[r] : Acc(0);
    if (ignored(t) || (g == Acc(0) && h == Acc(0))) {
      std::fill(row, row + vb, Acc(0));
      continue;
    }
    const Acc row_lse = lse[r], mu = kEntropy ? row_lse - entropy[r] : Acc(0);
    const bool target_here = t >= v0 && t < v0 + vb;
    const Acc x_t = target_here ? row[t - v0] : Acc(0);  // read before the row is overwritten
    if (kEntropy && h != Acc(0)) {
      softmax_grad_chunk<true>(row, row, vb, inv_t, row_lse, mu, g, h);
    } else {
      softmax_grad_chunk<false>(row, row, vb, inv_t, row_lse, mu, g, Acc(0));
    }
    if (target_here) row[t - v0] = softmax_grad_at_target<Acc>(x_t, inv_t, row_lse, mu, g, h);
  }
}

// The gradient outputs (contiguous, the inputs' dtypes; undefined if not asked for) and the fp32
// (fp64) grad_hidden accumulator: the output itself when it has the accumulation type.
struct GradOutputs {
  at::Tensor grad_hidden, grad_weight, grad_bias, hidden_acc;
};

// A worker's buffers beyond BlockOperands: its share of grad_hidden for one chunk (added into the
// shared accumulator in block order), and fp32 accumulators for a 16-bit weight / bias block.
struct GradScratch {
  at::Tensor hidden_share, weight_acc, bias_acc;
};

template <bool kEntropy, typename T>
void backward_impl(const LinearOperands<T>& ops, const Blocking& blocking, const int64_t* targets,
                   typename Accumulate<T>::type inv_t, const IgnoreIndex& ignored,
                   const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& lse,
                   const at::Tensor& entropy, GradOutputs& out) {
  using Acc = typename Accumulate<T>::type;
  constexpr bool kAccInPlace = std::is_same_v<T, Acc>;
  const int64_t rows = ops.rows, H = ops.H, chunk_rows = std::min(blocking.token_chunk, rows);
  const int64_t num_chunks = ops.num_chunks(chunk_rows), max_block = std::min(blocking.vocab_block, ops.V);
  if (out.grad_hidden.defined()) {
    out.hidden_acc = kAccInPlace ? out.grad_hidden.view({rows, H}).zero_() : at::zeros({rows, H}, ops.acc_options);
  }
  OrderedBlocks blocks(ops.V, blocking.vocab_block);
  std::vector<std::optional<BlockOperands<T>>> workers(blocks.num_workers());
  std::vector<GradScratch> scratch(workers.size());
  blocks.run([&](int64_t worker, int64_t b, int64_t v0, int64_t vb) {
    GradScratch& mine = scratch[worker];
    if (!workers[worker]) {
      workers[worker].emplace(ops, blocking.vocab_block, blocking.token_chunk);
      if (out.hidden_acc.defined()) mine.hidden_share = at::empty({chunk_rows * H}, ops.acc_options);
      if (!kAccInPlace && out.grad_weight.defined()) mine.weight_acc = at::empty({max_block * H}, ops.acc_options);
      if (!kAccInPlace && out.grad_bias.defined()) mine.bias_acc = at::empty({max_block}, ops.acc_options);
    }
    auto [weight_block, bias_block] = workers[worker]->weight_and_bias(ops, v0, vb);
    at::Tensor weight_grad, bias_grad;  // this block's gradients, complete after the chunk loop
    if (out.grad_weight.defined()) {
      weight_grad = kAccInPlace ? out.grad_weight.narrow(0, v0, vb) : mine.weight_acc.narrow(0, 0, vb * H).view({vb, H});
    }
    if (out.grad_bias.defined()) {
      bias_grad = kAccInPlace ? out.grad_bias.narrow(0, v0, vb) : mine.bias_acc.narrow(0, 0, vb);
    }
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t r0 = c * chunk_rows, n = std::min(chunk_rows, rows - r0);
      const at::Tensor hidden_chunk = ops.hidden_matrix.narrow(0, r0, n);
      at::Tensor logits = workers[worker]->logits(hidden_chunk, weight_block, bias_block);
      logits_grad_block<kEntropy>(logits.data_ptr<Acc>(), n, vb, r0, v0, targets, ignored, inv_t,
                                  grad_logp.const_data_ptr<Acc>(),
                                  kEntropy ? grad_entropy.const_data_ptr<Acc>() : nullptr, lse.const_data_ptr<Acc>(),
                                  kEntropy ? entropy.const_data_ptr<Acc>() : nullptr);
      const at::Tensor& grad_logits = logits;  // (n, vb), now dL/dlogits
      if (weight_grad.defined()) {
        if (c == 0) {
          at::mm_out(weight_grad, grad_logits.t(), hidden_chunk);
        } else {
          weight_grad.addmm_(grad_logits.t(), hidden_chunk);
        }
      }
      if (bias_grad.defined()) {
        if (c == 0) {
          at::sum_out(bias_grad, grad_logits, at::IntArrayRef{0});
        } else {
          bias_grad.add_(grad_logits.sum(0));
        }
      }
      if (out.hidden_acc.defined()) {
        at::Tensor share = mine.hidden_share.narrow(0, 0, n * H).view({n, H});
        at::mm_out(share, grad_logits, weight_block);
        blocks.commit(b * num_chunks + c, [&] { out.hidden_acc.narrow(0, r0, n).add_(share); });
      }
    }
    if (!kAccInPlace && weight_grad.defined()) out.grad_weight.narrow(0, v0, vb).copy_(weight_grad);
    if (!kAccInPlace && bias_grad.defined()) out.grad_bias.narrow(0, v0, vb).copy_(bias_grad);
  });
  if (!kAccInPlace && out.grad_hidden.defined()) out.grad_hidden.view({rows, H}).copy_(out.hidden_acc);
}

// Gradients of linear_token_logprobs_fwd w.r.t. hidden ((outer, inner, H), contiguous), weight
// ((V, H), contiguous) and bias ((V,)), each in its input's dtype; a gradient not asked for comes
// back as an empty tensor. The entropy term only with with_entropy (the caller clears it when no gradient
// flows into the entropy; grad_entropy is empty then).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logprobs_bwd(
    const at::Tensor& grad_logp, const at::Tensor& grad_entropy, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& entropy, bool need_hidden, bool need_weight, bool need_bias, double temperature,
    std::optional<int64_t> ignore_index, bool with_entropy, int64_t vocab_block, int64_t token_chunk) {
  check_operands(hidden, weight, bias, targets, vocab_block, token_chunk);
  at::NoGradGuard no_grad;
  const int64_t rows = targets.numel();
  TORCH_CHECK(grad_logp.is_contiguous() && grad_logp.numel() == rows && grad_logp.scalar_type() == lse.scalar_type(),
              "grad_logp must be contiguous, of the forward's output dtype, with one entry per row");
  const IgnoreIndex ignored(ignore_index);
  if (with_entropy) {
    TORCH_CHECK(grad_entropy.is_contiguous() && grad_entropy.numel() == rows && entropy.numel() == rows,
                "grad_entropy and entropy must have one entry per row");
  }
  need_bias = need_bias && bias.has_value();
  GradOutputs out;
  if (need_hidden) out.grad_hidden = at::empty(hidden.sizes(), hidden.options());
  if (need_weight) out.grad_weight = at::empty(weight.sizes(), weight.options());
  if (need_bias) out.grad_bias = at::empty(bias->sizes(), bias->options());
  if (rows == 0) {  // no rows: the gradients are zero
    for (at::Tensor* g : {&out.grad_hidden, &out.grad_weight, &out.grad_bias}) {
      if (g->defined()) g->zero_();
    }
  } else if (need_hidden || need_weight || need_bias) {
    // Ignored rows are never read: their dL/dlogits is 0, but 0 * NaN (or inf) held there -- in the hidden
    // row for grad_weight, in the weight for that row's grad_hidden -- would still be NaN. Such rows of
    // hidden are zeroed (a copy, only when a row is ignored) and their grad_hidden cleared.
    at::Tensor ignored_rows;
    if (ignore_index.has_value()) {
      ignored_rows = targets.reshape({hidden.size(0), hidden.size(1), 1}).eq(*ignore_index);
      if (!ignored_rows.any().item<bool>()) ignored_rows = at::Tensor();
    }
    const at::Tensor read_hidden = ignored_rows.defined() ? hidden.masked_fill(ignored_rows, 0).contiguous() : hidden;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_token_logprobs_bwd", [&] {
      using acc_t = typename Accumulate<scalar_t>::type;
      const LinearOperands<scalar_t> ops(read_hidden, weight, bias);
      auto run = [&](auto entropy_tag) {
        backward_impl<decltype(entropy_tag)::value>(ops, Blocking{vocab_block, token_chunk},
                                                    targets.const_data_ptr<int64_t>(),
                                                    static_cast<acc_t>(1.0 / temperature), ignored,
                                                    grad_logp, grad_entropy, lse, entropy, out);
      };
      with_entropy ? run(std::true_type{}) : run(std::false_type{});
    });
    if (ignored_rows.defined() && out.grad_hidden.defined()) out.grad_hidden.masked_fill_(ignored_rows, 0);
  }
  // a gradient not asked for is a fresh empty tensor (outputs of a custom op must not alias each other)
  auto or_empty = [&](const at::Tensor& g) { return g.defined() ? g : hidden.new_empty({0}); };
  return {or_empty(out.grad_hidden), or_empty(out.grad_weight), or_empty(out.grad_bias)};
}

}  // namespace
}  // namespace cai

TORCH_LIBRARY_FRAGMENT(cai_kernels_cpu, m) {
  m.def("linear_token_logprobs_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
        "int? ignore_index, bool with_entropy, int vocab_block, int token_chunk) -> (Tensor, Tensor, Tensor)");
  m.def("linear_token_logprobs_bwd(Tensor grad_logp, Tensor grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor? bias, Tensor targets, Tensor lse, Tensor entropy, bool need_hidden, bool need_weight, "
        "bool need_bias, float temperature, int? ignore_index, bool with_entropy, int vocab_block, "
        "int token_chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cai_kernels_cpu, CPU, m) {
  m.impl("linear_token_logprobs_fwd", &cai::linear_token_logprobs_fwd);
  m.impl("linear_token_logprobs_bwd", &cai::linear_token_logprobs_bwd);
}
