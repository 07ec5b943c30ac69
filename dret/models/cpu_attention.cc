// Fused softmax attention for XLA:CPU (an XLA FFI handler), float32, forward only (the gradient is XLA's).
//
// q [B, T, N, H], k and v [B, S, N, H], key mask [B, S] (nonzero = real token) -> out [B, T, N, H].
// One task per (example, head): its unmasked keys are packed (K transposed), then blocks of query rows compute
// scores, softmax and the value product while the block's scores stay in L1. XLA itself writes each [T, S]
// score matrix to memory between the two products and the softmax.
// Matches `dret.models.attention._attend`: a query with no real key averages all values (uniform weights).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int W = 16;  // floats per vector
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// 2^x for x <= 0 (log2-scaled scores minus their row max): Cephes' exp2f polynomial on [-1/2, 1/2] (relative
// error 1.7e-7); below -126 it returns 2^-126 instead of a subnormal, a weight that adds nothing to a sum of 1.
inline vf exp2_nonpositive(vf x) {
  x = x > -126.0f ? x : splat(-126.0f);
  vf n = (x + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = x - n;
  vf p = splat(1.535336188319500e-4f);
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t b, t, s, n;  // the head size is attend_head's template argument
};

// Scratch of one worker: packed keys [H][S_pad], packed values [S_pad][H], scores [R][S_pad], key bias [S_pad].
struct Scratch {
  std::vector<float> kt, v, p, key_bias;
  std::vector<int32_t> keys;
};

// Query rows [R, H] against the packed keys: scores in log2 units, softmax, values. `key_bias` is 0 for a real key
// and -inf for a padding column of the last key block.
template <int R, int HV>
void attend_rows(const float* q, int64_t q_stride, int rows, const float* kt, const float* v, const float* key_bias,
                 int64_t s_pad, float scale, float* p, float* out, int64_t out_stride) {
  constexpr int H = HV * W;
  // scores [R, s_pad] = q [R, H] . kt [H, s_pad] * scale, two vectors of keys at a time, with row maxima
  vf row_max[R];
  for (int r = 0; r < R; ++r) row_max[r] = splat(-INFINITY);
  for (int64_t j = 0; j < s_pad; j += 2 * W) {
    vf acc[R][2] = {};
    for (int c = 0; c < H; ++c) {
      vf k0 = load(kt + c * s_pad + j), k1 = load(kt + c * s_pad + j + W);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        vf qr = splat(q[r * q_stride + c]);
        acc[r][0] += qr * k0;
        acc[r][1] += qr * k1;
      }
    }
    vf b0 = load(key_bias + j), b1 = load(key_bias + j + W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vf s0 = acc[r][0] * scale + b0, s1 = acc[r][1] * scale + b1;
      store(p + r * s_pad + j, s0);
      store(p + r * s_pad + j + W, s1);
      s0 = s0 > s1 ? s0 : s1;
      row_max[r] = s0 > row_max[r] ? s0 : row_max[r];
    }
  }
  // softmax numerators in place
  float inv_sum[R];
  for (int r = 0; r < R; ++r) {
    float m = -INFINITY;
    for (int i = 0; i < W; ++i) m = std::max(m, row_max[r][i]);
    float* pr = p + r * s_pad;
    vf sum = {};
    for (int64_t j = 0; j < s_pad; j += W) {
      vf e = exp2_nonpositive(load(pr + j) - m);
      store(pr + j, e);
      sum += e;
    }
    float total = 0.0f;
    for (int i = 0; i < W; ++i) total += sum[i];
    inv_sum[r] = 1.0f / total;
  }
  // out [R, H] = p [R, s_pad] . v [s_pad, H]
  vf acc[R][HV] = {};
  for (int64_t j = 0; j < s_pad; ++j) {
    vf vj[HV];
    for (int c = 0; c < HV; ++c) vj[c] = load(v + j * H + c * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vf pr = splat(p[r * s_pad + j]);
      for (int c = 0; c < HV; ++c) acc[r][c] += pr * vj[c];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < HV; ++c) store(out + r * out_stride + c * W, acc[r][c] * inv_sum[r]);
}

template <int HV>
void attend_head(const Shape& sh, const float* q, const float* k, const float* v, const int32_t* mask, float* out,
                 int64_t bi, int64_t ni, Scratch& scratch) {
  constexpr int H = HV * W;
  constexpr int R = HV == 1 ? 12 : HV == 2 ? 10 : HV == 4 ? 5 : 2;  // accumulators fill the 32 vector registers
  const int64_t row = sh.n * H;                                      // stride between tokens
  auto& keys = scratch.keys;
  keys.clear();
  for (int64_t j = 0; j < sh.s; ++j)
    if (mask[bi * sh.s + j]) keys.push_back(static_cast<int32_t>(j));
  float scale = 1.4426950408889634f / std::sqrt(static_cast<float>(H));  // log2(e) / sqrt(H)
  if (keys.empty()) {  // no real key: uniform weights over all of them, as the masked softmax gives
    for (int64_t j = 0; j < sh.s; ++j) keys.push_back(static_cast<int32_t>(j));
    scale = 0.0f;
  }
  const int64_t s_real = keys.size(), s_pad = (s_real + 2 * W - 1) / (2 * W) * (2 * W);
  scratch.kt.resize(H * s_pad);
  scratch.v.resize(s_pad * H);
  scratch.p.resize(R * s_pad);
  scratch.key_bias.assign(s_pad, 0.0f);
  for (int64_t j = s_real; j < s_pad; ++j) {  // padding columns: no weight, and zero keys and values
    scratch.key_bias[j] = -INFINITY;
    for (int c = 0; c < H; ++c) scratch.kt[c * s_pad + j] = 0.0f;
  }
  std::fill(scratch.v.begin() + s_real * H, scratch.v.end(), 0.0f);
  const float* kb = k + (bi * sh.s * sh.n + ni) * H;
  const float* vb = v + (bi * sh.s * sh.n + ni) * H;
  for (int64_t j = 0; j < s_real; ++j) {
    const float* kj = kb + keys[j] * row;
    for (int c = 0; c < H; ++c) scratch.kt[c * s_pad + j] = kj[c];
    std::memcpy(&scratch.v[j * H], vb + keys[j] * row, H * sizeof(float));
  }
  const float* qb = q + (bi * sh.t * sh.n + ni) * H;
  float* ob = out + (bi * sh.t * sh.n + ni) * H;
  auto attend = [&](const float* q_rows, int64_t q_stride, int rows, float* out_rows, int64_t out_stride) {
    attend_rows<R, HV>(q_rows, q_stride, rows, scratch.kt.data(), scratch.v.data(), scratch.key_bias.data(), s_pad,
                       scale, scratch.p.data(), out_rows, out_stride);
  };
  std::vector<float> q_tail, out_tail;
  for (int64_t i = 0; i < sh.t; i += R) {
    int rows = static_cast<int>(std::min<int64_t>(R, sh.t - i));
    if (rows == R) {
      attend(qb + i * row, row, R, ob + i * row, row);
    } else {  // last rows: copy into a zero-padded block
      q_tail.assign(R * H, 0.0f);
      out_tail.assign(R * H, 0.0f);
      for (int r = 0; r < rows; ++r) std::memcpy(&q_tail[r * H], qb + (i + r) * row, H * sizeof(float));
      attend(q_tail.data(), H, rows, out_tail.data(), H);
      for (int r = 0; r < rows; ++r) std::memcpy(ob + (i + r) * row, &out_tail[r * H], H * sizeof(float));
    }
  }
}

using HeadFn = void (*)(const Shape&, const float*, const float*, const float*, const int32_t*, float*, int64_t,
                        int64_t, Scratch&);

HeadFn head_fn(int64_t h) {
  switch (h) {
    case 16: return attend_head<1>;
    case 32: return attend_head<2>;
    case 64: return attend_head<4>;
    case 128: return attend_head<8>;
    default: return nullptr;
  }
}

// Work shared by the calling thread and pool helpers; helpers may start after the call returned, so it is
// reference counted and they only touch it while work remains.
struct Job {
  Shape sh;
  const float *q, *k, *v;
  const int32_t* mask;
  float* out;
  HeadFn fn;
  int64_t tasks;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    Scratch scratch;
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) {
      fn(sh, q, k, v, mask, out, i / sh.n, i % sh.n, scratch);
      if (done.fetch_add(1, std::memory_order_release) + 1 == tasks) done.notify_all();
    }
  }

  // Blocks (without spinning) until every task has finished; the caller has claimed all it could.
  void wait() {
    for (int64_t seen; (seen = done.load(std::memory_order_acquire)) < tasks;) done.wait(seen);
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> mask, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || mask.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("dret_cpu_attention: expected q [B,T,N,H], k, v [B,S,N,H], mask [B,S]");
  auto job = std::make_shared<Job>();
  job->sh = Shape{qd[0], qd[1], kd[1], qd[2]};
  job->fn = head_fn(qd[3]);
  if (!job->fn) return ffi::Error::InvalidArgument("dret_cpu_attention: head size must be 16, 32, 64 or 128");
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->mask = mask.typed_data();
  job->out = out->typed_data();
  job->tasks = job->sh.b * job->sh.n;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), job->tasks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->run(); });
  job->run();
  job->wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DretCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
