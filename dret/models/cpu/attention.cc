// Fused softmax attention for XLA:CPU (an XLA FFI handler), float32, forward only (the gradient is XLA's).
//
// q [B, T, N, H], k and v [B, S, N, H], query segments [B, T], key segments [B, S] -> out [B, T, N, H].
// Query i sees key j when key j's segment is nonzero (a real token) and equals query i's, or query i's is 0:
// packed rows hold several texts, and a 0/1 key mask with all-zero query segments is plain key masking.
// One task per (example, head). For each run of queries with one segment, the keys it sees are packed
// (K transposed), then blocks of query rows compute scores, softmax and the value product while the block's
// scores stay in L1. XLA itself writes each [T, S] score matrix to memory between the two products and the softmax.
// Matches `dret.models.cpu.attention.blocked_attention`: a query that sees no key averages all values (uniform
// weights).

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

// A maximal run of positions [begin, end) with one segment id.
struct Run {
  int32_t segment;
  int64_t begin, end;
  bool operator==(const Run&) const = default;
};

void runs_of(const int32_t* segments, int64_t n, std::vector<Run>& runs) {
  runs.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (runs.empty() || runs.back().segment != segments[i]) runs.push_back(Run{segments[i], i, i});
    runs.back().end = i + 1;
  }
}

// Scratch of one worker: packed keys [H][S_pad], packed values [S_pad][H], scores [R][S_pad], key bias [S_pad];
// the segment runs of the example, and the key runs that are packed now.
struct Scratch {
  std::vector<float> kt, v, p, key_bias;
  std::vector<Run> q_runs, kv_runs, keys, packed;
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

// Query rows per block for a head of HV vectors: their accumulators fill the 32 vector registers.
template <int HV>
constexpr int kRows = HV == 1 ? 12 : HV == 2 ? 10 : HV == 4 ? 5 : 2;

// Packs the keys and values of `keys` (runs of positions) for head ni of example bi; returns s_pad.
template <int HV>
int64_t pack_keys(const Shape& sh, const float* k, const float* v, int64_t bi, int64_t ni, Scratch& scratch) {
  constexpr int H = HV * W;
  const int64_t row = sh.n * H;  // stride between tokens
  int64_t s_real = 0;
  for (const Run& r : scratch.keys) s_real += r.end - r.begin;
  const int64_t s_pad = (s_real + 2 * W - 1) / (2 * W) * (2 * W);
  scratch.kt.resize(H * s_pad);
  scratch.v.resize(s_pad * H);
  scratch.p.resize(kRows<HV> * s_pad);
  scratch.key_bias.assign(s_pad, 0.0f);
  for (int64_t j = s_real; j < s_pad; ++j) {  // padding columns: no weight, and zero keys and values
    scratch.key_bias[j] = -INFINITY;
    for (int c = 0; c < H; ++c) scratch.kt[c * s_pad + j] = 0.0f;
  }
  std::fill(scratch.v.begin() + s_real * H, scratch.v.end(), 0.0f);
  const float* kb = k + (bi * sh.s * sh.n + ni) * H;
  const float* vb = v + (bi * sh.s * sh.n + ni) * H;
  int64_t j = 0;
  for (const Run& r : scratch.keys)
    for (int64_t pos = r.begin; pos < r.end; ++pos, ++j) {
      const float* kj = kb + pos * row;
      for (int c = 0; c < H; ++c) scratch.kt[c * s_pad + j] = kj[c];
      std::memcpy(&scratch.v[j * H], vb + pos * row, H * sizeof(float));
    }
  return s_pad;
}

template <int HV>
void attend_head(const Shape& sh, const float* q, const float* k, const float* v, const int32_t* q_segments,
                 const int32_t* kv_segments, float* out, int64_t bi, int64_t ni, Scratch& scratch) {
  constexpr int H = HV * W;
  constexpr int R = kRows<HV>;
  const int64_t row = sh.n * H;  // stride between tokens
  const float log2_scale = 1.4426950408889634f / std::sqrt(static_cast<float>(H));  // log2(e) / sqrt(H)
  runs_of(q_segments + bi * sh.t, sh.t, scratch.q_runs);
  runs_of(kv_segments + bi * sh.s, sh.s, scratch.kv_runs);
  scratch.packed.clear();
  int64_t s_pad = 0;
  const float* qb = q + (bi * sh.t * sh.n + ni) * H;
  float* ob = out + (bi * sh.t * sh.n + ni) * H;
  std::vector<float> q_tail, out_tail;
  for (const Run& query_run : scratch.q_runs) {
    scratch.keys.clear();
    for (const Run& r : scratch.kv_runs)
      if (r.segment != 0 && (query_run.segment == 0 || r.segment == query_run.segment)) scratch.keys.push_back(r);
    float scale = log2_scale;
    if (scratch.keys.empty()) {  // no key to see: uniform weights over all of them, as the masked softmax gives
      scratch.keys.push_back(Run{0, 0, sh.s});
      scale = 0.0f;
    }
    if (scratch.keys != scratch.packed) {
      s_pad = pack_keys<HV>(sh, k, v, bi, ni, scratch);
      scratch.packed = scratch.keys;
    }
    auto attend = [&](const float* q_rows, int64_t q_stride, int rows, float* out_rows, int64_t out_stride) {
      attend_rows<R, HV>(q_rows, q_stride, rows, scratch.kt.data(), scratch.v.data(), scratch.key_bias.data(),
                         s_pad, scale, scratch.p.data(), out_rows, out_stride);
    };
    for (int64_t i = query_run.begin; i < query_run.end; i += R) {
      int rows = static_cast<int>(std::min<int64_t>(R, query_run.end - i));
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
}

using HeadFn = void (*)(const Shape&, const float*, const float*, const float*, const int32_t*, const int32_t*,
                        float*, int64_t, int64_t, Scratch&);

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
  const int32_t *q_segments, *kv_segments;
  float* out;
  HeadFn fn;
  int64_t tasks;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    Scratch scratch;
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) {
      fn(sh, q, k, v, q_segments, kv_segments, out, i / sh.n, i % sh.n, scratch);
      if (done.fetch_add(1, std::memory_order_release) + 1 == tasks) done.notify_all();
    }
  }

  // Blocks (without spinning) until every task has finished; the caller has claimed all it could.
  void wait() {
    for (int64_t seen; (seen = done.load(std::memory_order_acquire)) < tasks;) done.wait(seen);
  }
};

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_segments, ffi::Buffer<ffi::S32> kv_segments,
                     ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || q_segments.dimensions().size() != 2 || kv_segments.dimensions().size() != 2)
    return ffi::Error::InvalidArgument(
        "dret_cpu_attention: expected q [B,T,N,H], k, v [B,S,N,H], segments [B,T] and [B,S]");
  auto job = std::make_shared<Job>();
  job->sh = Shape{qd[0], qd[1], kd[1], qd[2]};
  job->fn = head_fn(qd[3]);
  if (!job->fn) return ffi::Error::InvalidArgument("dret_cpu_attention: head size must be 16, 32, 64 or 128");
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->q_segments = q_segments.typed_data();
  job->kv_segments = kv_segments.typed_data();
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
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
