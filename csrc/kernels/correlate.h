// The engine's hot loop: a register-blocked multi-channel correlation tile.
//
// Every heavy product of the placement op is one correlation of a zero-padded plane with a small
// kernel, summed over channels:
//   grad_loc[i,y,x]  = Σ_c Σ_{u,v} Gp[c, y+u, x+v] · sprite[i,c,u,v]          (backward, ~all FLOPs)
//   canvas[c,y,x]    = Σ_i Σ_{u,v} Lp[i, y+u, x+v] · sprite[i,c,S−1−u,S−1−v]  (dense forward)
//   grad_spr[i,c,u,v] = Σ_y Σ_x Gp[c, u+y, v+x] · loc[i,y,x]                 (dense backward)
// (Gp: dL/dΣ padded by S//2; Lp: the location maps padded by S//2.) One tile computes OB output
// channels × NX vectors along a row. Per input position it loads NX vectors once and issues OB·NX
// fused multiply-adds with broadcast weights, so OB·NX accumulators stay in registers and the loop
// is bound by FMA throughput rather than by loads. OB·NX is kept at ~8 or more (enough
// independent chains to hide FMA latency) and within the register file: with 32 registers
// (AVX-512) up to 24 accumulators, with 16 (AVX2, SSE) up to 12 plus the NX loaded vectors and a
// broadcast weight. A tile that needs more registers than there are spills its accumulators to
// the stack on every tap.
#pragma once

#include <array>
#include <utility>

#include "common.h"

namespace lavae_fast {
namespace LAVAE_ISA {

// The channel loop has two levels (a, r) so that rows of several padded planes can be walked
// without building an im2col panel: input row (a, r) starts at in + a*sa + r*sr.
struct TileArgs {
  const void* in;   // first input element of the tile (row 0, column 0 of the window)
  int64_t NA, sa;   // outer channel count and stride (elements)
  int64_t NR, sr;   // inner row count and stride
  int64_t KW;       // kernel width: taps along the row
  const void* w;    // weights [(a*NR + r)*KW + v][OB], contiguous in the output channel
  void* out;        // out[o*out_stride + x]
  int64_t out_stride;
  int64_t valid;    // number of output columns to store (≤ NX·VL)
  bool accumulate = false;  // add to the values in `out` instead of overwriting them
  int64_t prefetch = 0;     // prefetching tiles only: distance (elements) ahead along each row
};

// out[o*out_stride + x] (+)= Σ_{a,r,v} in[a*sa + r*sr + v + x] · w[((a*NR + r)*KW + v)*OB + o].
// Reads in[... + v + x] for every x < NX·VL, so the input rows must be readable (and should be
// zero) NX·VL − 1 columns past the last tap.
//
// PF: also prefetch (into L2) the NX vectors `t.prefetch` elements further along each input row.
// A caller that walks many rows at a large stride (gather's 1×1 correlation reads 64 feature
// planes 16 KB apart) gets no help from the hardware prefetcher and would otherwise wait on DRAM
// for every row; spread among the FMAs, these requests keep the memory busy while it computes.
template <typename T, int OB, int NX, bool PF = false>
void corr_tile(const TileArgs& t) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  V acc[OB][NX];
  T* out = static_cast<T*>(t.out);
  if (!t.accumulate) {
    for (int o = 0; o < OB; ++o)
      for (int j = 0; j < NX; ++j) acc[o][j] = V{};
  } else if (t.valid == NX * N) {
    for (int o = 0; o < OB; ++o)
      for (int j = 0; j < NX; ++j) acc[o][j] = vload<V>(out + o * t.out_stride + j * N);
  } else {
    alignas(64) T tmp[NX * N] = {};
    for (int o = 0; o < OB; ++o) {
      for (int64_t x = 0; x < t.valid; ++x) tmp[x] = out[o * t.out_stride + x];
      for (int j = 0; j < NX; ++j) acc[o][j] = vload<V>(tmp + j * N);
    }
  }
  const T* in = static_cast<const T*>(t.in);
  const T* w = static_cast<const T*>(t.w);
  for (int64_t a = 0; a < t.NA; ++a) {
    for (int64_t r = 0; r < t.NR; ++r) {
      const T* row = in + a * t.sa + r * t.sr;
      if constexpr (PF) {
        for (int j = 0; j < NX; ++j) __builtin_prefetch(row + t.prefetch + j * N, 0, 2);
      }
      for (int64_t v = 0; v < t.KW; ++v) {
        V xv[NX];
        for (int j = 0; j < NX; ++j) xv[j] = vload<V>(row + v + j * N);
        for (int o = 0; o < OB; ++o) {
          const T wv = w[o];
          for (int j = 0; j < NX; ++j) acc[o][j] += xv[j] * wv;
        }
        w += OB;
      }
    }
  }
  if (t.valid == NX * N) {
    for (int o = 0; o < OB; ++o)
      for (int j = 0; j < NX; ++j) vstore(out + o * t.out_stride + j * N, acc[o][j]);
  } else {
    alignas(64) T tmp[NX * N];
    for (int o = 0; o < OB; ++o) {
      for (int j = 0; j < NX; ++j) vstore(tmp + j * N, acc[o][j]);
      for (int64_t x = 0; x < t.valid; ++x) out[o * t.out_stride + x] = tmp[x];
    }
  }
}

constexpr int kMaxOB = 12;
// Vectors along a row in one tile: 1, 2, 4, or (for one or two output channels with 16
// registers, where 4 would leave too few accumulators to hide the FMA latency) 8.
constexpr int kMaxNX = kVecRegs >= 32 ? 4 : 8;

// Columns a tile may read past its first output column: callers pad their rows by this much.
template <typename T>
constexpr int64_t max_tile_cols() {
  return kMaxNX * Vec<T>::N;
}

using TileFn = void (*)(const TileArgs&);

template <typename T, int NX, bool PF, int... OBs>
constexpr auto make_row(std::integer_sequence<int, OBs...>) {
  return std::array<TileFn, sizeof...(OBs)>{&corr_tile<T, OBs + 1, NX, PF>...};
}

// tile_fn<T>(ob, nx, prefetch): the instantiation for ob in [1, kMaxOB], nx in {1, 2, 4} (and 8
// for ob <= 2 where kMaxNX is 8), with or without the row prefetch (TileArgs::prefetch).
template <typename T, bool PF>
TileFn tile_fn_impl(int ob, int nx) {
  static const auto r1 = make_row<T, 1, PF>(std::make_integer_sequence<int, kMaxOB>{});
  static const auto r2 = make_row<T, 2, PF>(std::make_integer_sequence<int, kMaxOB>{});
  static const auto r4 = make_row<T, 4, PF>(std::make_integer_sequence<int, kMaxOB>{});
  static const auto r8 = make_row<T, 8, PF>(std::make_integer_sequence<int, 2>{});
  TORCH_INTERNAL_ASSERT(ob >= 1 && ob <= kMaxOB && (nx == 1 || nx == 2 || nx == 4 || (nx == 8 && ob <= 2)));
  return nx == 1 ? r1[ob - 1] : nx == 2 ? r2[ob - 1] : nx == 4 ? r4[ob - 1] : r8[ob - 1];
}

template <typename T>
TileFn tile_fn(int ob, int nx, bool prefetch = false) {
  return prefetch ? tile_fn_impl<T, true>(ob, nx) : tile_fn_impl<T, false>(ob, nx);
}

// Split `m` output channels into blocks of at most kMaxOB, as even as possible (10 → 10,
// 13 → 7+6, 32 → 11+11+10), so no block is left with a register-starved remainder.
inline int64_t block_size(int64_t m) {
  if (m <= 0) return 0;
  const int64_t nblk = ceil_div(m, kMaxOB);
  return ceil_div(m, nblk);
}

// Vectors per row in a tile: enough accumulators (OB·NX ≥ 8 where possible) within the register
// file (see the top of this file), without computing many columns past the row's end (`width`
// useful columns).
template <typename T>
int choose_nx(int64_t ob, int64_t width) {
  constexpr int N = Vec<T>::N;
  int nx;
  if constexpr (kVecRegs >= 32)
    nx = ob <= 3 ? 4 : 2;  // ≤ 24 accumulators
  else
    nx = ob <= 2 ? (ob == 1 ? 8 : 4) : ob <= 6 ? 2 : 1;  // ≤ 12 accumulators, (OB+1)·NX + 1 ≤ 16 registers
  while (nx > 1 && (nx / 2) * N >= width) nx /= 2;
  return nx;
}

}  // namespace LAVAE_ISA
}  // namespace lavae_fast
