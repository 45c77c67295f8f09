// The long-context ("qk") pass of one KV group's block of query rows, fused (capture/qk_kernel.py).
//
// For each query head of the group and each tile of `tile` rows (one GEMM each way), and within the
// tile row by row, so that a row's scores stay in the core's cache between the passes that read them:
//
//   s = q kᵀ (q pre-scaled; GEMM), softcap        -> scores  # [tile, k_end]
//   m = max_j s_j;  e_j = exp(s_j - m);  Z = sum_j e_j   (keys j <= the row's position only)
//   entropy = m + ln Z - sum_j e_j s_j / Z;  distance = i - sum_j e_j j / Z
//   w_j = e_j / Z: column sums (float64), block-max thumbnails, WAAD
//   out = w v (GEMM)
//
// which is what capture/engine/longctx.py computes with torch ops on whole [rows, keys] blocks; the
// difference is only how often the weights travel through memory.  Compiled with -ffast-math for
// vectorised expf (glibc libmvec); only the visible keys are ever read, so no infinities occur.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

struct Pool {  // one head's block-max thumbnail  # [bins, bins], row-major
  float* data;
  int64_t bins;
  int64_t size;  // tokens per bin
};

inline float range_max(const float* x, int64_t a, int64_t b) {
  float m = x[a];
  for (int64_t j = a + 1; j < b; ++j) m = std::max(m, x[j]);
  return m;
}

inline void soft_cap(float* x, int64_t length, float cap) {  // cap tanh(x / cap), as transformers (cap > 0)
  if (cap > 0.f)
    for (int64_t j = 0; j < length; ++j) x[j] = std::tanh(x[j] / cap) * cap;
}

// Fold one row's weights x  # [length] into its thumbnail row  # [bins]: the max of each block of `size` keys.
inline void fold_thumbnail(const float* x, int64_t length, float* thumb, int64_t size) {
  for (int64_t b = 0, a = 0; a < length; ++b, a += size)
    thumb[b] = std::max(thumb[b], range_max(x, a, std::min(a + size, length)));
}

// One row: x  # [>= length] its scores on entry and its weights on exit (zero past `length`,
// up to `width`).  Returns nothing; writes the row's reductions.
inline void row(float* x, int64_t position, int64_t length, int64_t width, float softcap, double* colsum,
                double* colsum_resp, float* entropy, float* distance, float* waad, int64_t window,
                Pool* pools, int n_pools) {
  soft_cap(x, length, softcap);
  const float m = range_max(x, 0, length);
  float z = 0.f, es = 0.f, ej = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const float e = std::exp(x[j] - m);
    z += e;
    es += e * x[j];
    ej += e * static_cast<float>(j);
    x[j] = e;
  }
  const float inv = 1.f / z;
  *entropy = m + std::log(z) - es * inv;
  *distance = static_cast<float>(position) - ej * inv;
  for (int64_t j = 0; j < length; ++j) {
    const float w = x[j] * inv;
    x[j] = w;
    colsum[j] += static_cast<double>(w);
  }
  if (colsum_resp != nullptr)
    for (int64_t j = 0; j < length; ++j) colsum_resp[j] += static_cast<double>(x[j]);
  std::fill(x + length, x + width, 0.f);
  float band = 0.f;
  for (int64_t k = 0; k < window && k <= position; ++k) band += x[position - k] * static_cast<float>(window - k);
  *waad = static_cast<float>(window) - band;
  for (int p = 0; p < n_pools; ++p)
    fold_thumbnail(x, length, pools[p].data + (position / pools[p].size) * pools[p].bins, pools[p].size);
}

}  // namespace

// q  # [G, rows, D] scaled queries of the group's heads, rows r0 .. r0+rows-1 (last dim contiguous)
// key_t  # [D, n];  value  # [n, D]
// out  # [G, rows, D];  entropy, distance, waad  # [G, rows] (views into the layer's arrays)
// colsum, colsum_resp  # [G, n] float64 (colsum_resp empty: none);  rows at positions >= split add to it
// pool_a, pool_b  # [G, bins, bins] float32 block-max thumbnails, size_a / size_b tokens per bin
void attend_rows(torch::Tensor q, torch::Tensor key_t, torch::Tensor value, int64_t r0, torch::Tensor out,
                 torch::Tensor entropy, torch::Tensor distance, torch::Tensor waad, torch::Tensor colsum,
                 torch::Tensor colsum_resp, int64_t split, torch::Tensor pool_a, int64_t size_a,
                 torch::Tensor pool_b, int64_t size_b, int64_t window, double softcap, int64_t tile) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && key_t.scalar_type() == torch::kFloat32 &&
              value.scalar_type() == torch::kFloat32, "attend_rows takes float32 tensors");
  TORCH_CHECK(colsum.scalar_type() == torch::kFloat64 && colsum.is_contiguous(), "colsum: contiguous float64");
  TORCH_CHECK(pool_a.is_contiguous() && pool_b.is_contiguous(), "pools must be contiguous");
  const int64_t G = q.size(0), rows = q.size(1), D = q.size(2);
  const int64_t n = key_t.size(1);
  const bool response = colsum_resp.numel() > 0;
  tile = std::max<int64_t>(1, std::min(tile, rows));
  torch::Tensor buffer = torch::empty({tile * (r0 + rows)}, q.options());
  torch::Tensor block_out = torch::empty({tile, D}, q.options());
  for (int64_t g = 0; g < G; ++g) {
    Pool pools[2] = {{pool_a[g].data_ptr<float>(), pool_a.size(1), size_a},
                     {pool_b[g].data_ptr<float>(), pool_b.size(1), size_b}};
    double* cs = colsum.data_ptr<double>() + g * n;
    double* cr = response ? colsum_resp.data_ptr<double>() + g * n : nullptr;
    float* ent = entropy[g].data_ptr<float>();
    float* dist = distance[g].data_ptr<float>();
    float* wa = waad[g].data_ptr<float>();
    const int64_t s_ent = entropy.stride(1), s_dist = distance.stride(1), s_wa = waad.stride(1);
    for (int64_t t0 = 0; t0 < rows; t0 += tile) {
      const int64_t t1 = std::min(rows, t0 + tile), tr = t1 - t0;
      const int64_t k_end = r0 + t1;  // the tile's last row sees keys 0 .. r0 + t1 - 1
      torch::Tensor scores = buffer.narrow(0, 0, tr * k_end).view({tr, k_end});
      torch::mm_out(scores, q[g].narrow(0, t0, tr), key_t.narrow(1, 0, k_end));
      float* s = scores.data_ptr<float>();
      for (int64_t i = 0; i < tr; ++i) {
        const int64_t local = t0 + i, position = r0 + local;
        row(s + i * k_end, position, position + 1, k_end, static_cast<float>(softcap), cs,
            (cr != nullptr && position >= split) ? cr : nullptr, ent + local * s_ent, dist + local * s_dist,
            wa + local * s_wa, window, pools, 2);
      }
      torch::Tensor o = block_out.narrow(0, 0, tr);
      torch::mm_out(o, scores, value.narrow(0, 0, k_end));
      out[g].narrow(0, t0, tr).copy_(o);
    }
  }
}

// MKL's Fortran BLAS, as libtorch_cpu exports it: a direct call costs ~1 µs where an ATen mm costs ~10.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Row-major c  # [m, n] = a  # [m, k] · bᵀ (b  # [n, k]); lda, ldb, ldc are row strides.
inline void mm_nt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

// Row-major c  # [m, n] = a  # [m, k] · b  # [k, n].
inline void mm_nn(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

inline void to_half(const float* x, at::Half* y, int64_t length) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= length; j += 8)  // round to nearest even, as torch's .half()
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < length; ++j) y[j] = static_cast<at::Half>(x[j]);
}

// One row of the stored-maps pass: x  # [>= width] its logits on entry, its weights on exit (zero
// from `length` to `width`); writes them as float16 to `map` and folds them into the thumbnail row.
inline void record_row(float* x, int64_t length, int64_t width, float scale, float cap, at::Half* map,
                       float* thumb, int64_t size) {
  for (int64_t j = 0; j < length; ++j) x[j] *= scale;
  soft_cap(x, length, cap);
  const float m = range_max(x, 0, length);
  float z = 0.f;
  for (int64_t j = 0; j < length; ++j) {
    const float e = std::exp(x[j] - m);
    z += e;
    x[j] = e;
  }
  const float inv = 1.f / z;
  for (int64_t j = 0; j < length; ++j) x[j] *= inv;
  std::fill(x + length, x + width, 0.f);
  to_half(x, map, length);
  fold_thumbnail(x, length, thumb, size);
}

}  // namespace

// record_layer: one layer of the stored-maps pass (layouts "tril" and "full", core/types.py).
// q  # [H, n, D];  k, v  # [KV, n, D] (any strides with a contiguous last dim)
// maps  # [H, width] float16: row p at p (p + 1) / 2 (tril, keys 0..p) or p n (full, all n keys)
// overview  # [H, bins, bins] float32, zeros on entry: block maxima over `size` x `size` tokens
// out  # [n, H, D]: softmax(scaling q kᵀ, softcapped, causal) v, as transformers' eager path in float32
// The work is bands of query rows of one head: scores (GEMM), the rows, output (GEMM), with direct BLAS
// calls (an ATen op costs ~10 µs, which counts at 128 tokens) on memory each thread owns.  A layer whose
// scores fit in `whole_bytes` goes in at most two parts of equal cost, one per thread, each part all
// heads of a band of rows (causal: rows [0, r) see keys [0, r) only and rows [r, n) all of them;
// r ≈ 0.618 n makes r² ≈ (n - r) n).  A larger one goes by items of (head, tile of `tile` rows), so a
// tile's scores stay in cache, dealt to the threads in two halves of equal cost (later causal rows cost
// more).  Band edges are multiples of `size`, so no two threads share a thumbnail row.
void record_layer(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scaling, double softcap, bool causal,
                  torch::Tensor maps, torch::Tensor overview, int64_t size, torch::Tensor out, int64_t tile,
                  int64_t whole_bytes) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && maps.scalar_type() == torch::kFloat16 &&
              maps.is_contiguous() && overview.is_contiguous() && out.is_contiguous() && q.stride(2) == 1 &&
              k.stride(2) == 1 && v.stride(2) == 1,
              "record_layer: float32 q/k/v with a contiguous last dim, contiguous float16 maps, overview and out");
  const int64_t H = q.size(0), n = q.size(1), D = q.size(2), KV = k.size(0), G = H / KV;
  const int64_t bins = overview.size(1), width = maps.size(1);
  at::Half* maps_data = maps.data_ptr<at::Half>();
  float* pooled_data = overview.data_ptr<float>();
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const float scale = static_cast<float>(scaling), cap = static_cast<float>(softcap);

  // head h, rows [row0, row1); `scores` holds [rows, keys seen]
  auto band = [&](int64_t h, int64_t row0, int64_t row1, float* scores) {
    const int64_t g = h / G, rows = row1 - row0, k_end = causal ? row1 : n;
    mm_nt(rows, k_end, D, qd + h * q.stride(0) + row0 * q.stride(1), q.stride(1), kd + g * k.stride(0),
          k.stride(1), scores, k_end);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = row0 + i;
      record_row(scores + i * k_end, causal ? p + 1 : n, k_end, scale, cap,
                 maps_data + h * width + (causal ? p * (p + 1) / 2 : p * n),
                 pooled_data + (h * bins + p / size) * bins, size);
    }
    mm_nn(rows, D, k_end, scores, k_end, vd + g * v.stride(0), v.stride(1), od + row0 * H * D + h * D, H * D);
  };

  if (H * n * n * 4 <= whole_bytes) {
    int64_t r = n;
    if (at::get_num_threads() > 1 && n >= 2 * size) {
      const double split = causal ? 0.618 * n : 0.5 * n;
      r = std::max(size, std::min(n - size, static_cast<int64_t>(std::lround(split / size)) * size));
    }
    const int64_t bounds[3] = {0, r, n};
    at::parallel_for(0, r < n ? 2 : 1, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        const int64_t row0 = bounds[part], row1 = bounds[part + 1];
        std::vector<float> scores((row1 - row0) * (causal ? row1 : n));
        for (int64_t h = 0; h < H; ++h) band(h, row0, row1, scores.data());
      }
    });
    return;
  }
  tile = std::max<int64_t>(size, (tile + size - 1) / size * size);
  const int64_t n_tiles = (n + tile - 1) / tile;
  std::vector<std::pair<int64_t, int64_t>> items, halves[2];  // (head, tile)
  for (int64_t t = 0; t < n_tiles; ++t)
    for (int64_t h = 0; h < H; ++h) items.emplace_back(h, t);
  for (size_t i = 0; i < items.size(); ++i) halves[i % 2].push_back(items[i]);  // items rise in cost
  items = halves[0];
  items.insert(items.end(), halves[1].begin(), halves[1].end());
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(tile * n);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = items[item].second * tile;
      band(items[item].first, t0, std::min(n, t0 + tile), scores.data());
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_rows", &attend_rows, "one KV group's rows of the qk pass, fused (capture/engine/fused.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("record_layer", &record_layer, "one layer of the stored-maps pass, fused (capture/engine/fused.cpp)",
        py::call_guard<py::gil_scoped_release>());
}
