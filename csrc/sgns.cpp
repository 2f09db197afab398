// Negative-sampling neuron-embedding trainer (ConceptEvo Step 1.3, Eq. 1).
//
// J1 = - sum_{(n,m) in D} [ log s(v_n.v_m) + sum_r log(1 - s(v_n.v_r)) + sum_r log(1 - s(v_m.v_r)) ]
//
// One table of float32 vectors (as the authors' code: no separate "context" table).
// Everything below is specified exactly so that conceptevo.neuron_embedding.
// numpy_reference_train reproduces a threads=1 run bit for bit.
//
// Arithmetic: IEEE float32 / double, round to nearest, no fused multiply-add (see the
// pragma below), so the SSE2, AVX2 and -march=native builds all give the same bits.
//
// Storage. Rows are padded to dp = ceil(dim / 8) * 8 floats with zeros (the zeros
// stay zero: their gradient is always +-0), 64-byte aligned.
//
// dot(x, y). Eight float32 lane accumulators, acc[l] = 0; for each block b of 8
// floats: acc[l] = acc[l] + x[8b+l] * y[8b+l]; then h[l] = acc[l] + acc[l+4] (l<4),
// q[l] = h[l] + h[l+2] (l<2), dot = q[0] + q[1]. (Vectorisable, fixed order.)
//
// sigmoid(x), x a float32 dot product: in double, e = exp_nonpos(-|x|) (our own
// polynomial exp below, so the oracle can repeat it and it vectorises), then
// (float)((x >= 0 ? 1 : e) / (1 + e)). The loss uses the same e: the pair's term of
// Eq. 1 is softplus(-s) + sum softplus(d) with softplus(z) = max(z, 0) + log(1 + e).
//
// Random numbers. splitmix64: mix(z) is its output finaliser, stream(s, k) =
// mix(s + (k + 1) * 0x9E3779B97F4A7C15) its k-th output from state s. Stream
// states: key(tag, e) = mix(mix(mix(seed) + tag) + e) with tag 1 = initial vectors,
// 2 = pair shuffle, 3 = negatives. below(x, n) = ((x >> 32) * n) >> 32.
//   init:      v[i][d] = init_range * (2 * ((x >> 40) * 2^-24) - 1) (float32 ops),
//              x = stream(key(1, 0), i * dim + d).
//   shuffle:   per epoch e (when shuffle=true) Fisher-Yates over the epoch's working
//              copy of the pair list (it starts in the given order and is NOT reset
//              between epochs): for i = P-1 .. 1: j = below(stream(key(2, e), P-1-i), i+1),
//              swap(pairs[i], pairs[j]).
//   negatives: the j-th negative of the pair at position i of epoch e:
//              x = stream(key(3, e), i * R + j), c = below(x, n); uniform: r = c;
//              alias table: r = (x & 0xffffffff) < threshold[c] ? c : alias[c].
//   The negatives depend only on (seed, e, i, j), never on the thread schedule.
//
// Learning rate of position i in epoch e: lr, or with lr_decay
// (float)(lr * max(1e-4, 1 - (e * P + i) / (epochs * P))) in double (word2vec style).
//
// Update for a pair (a, b) with negatives r_1..r_R (all reads happen before any write):
//   s = dot(v_a, v_b); gp = sigmoid(s) - 1
//   g_a = gp * v_b; g_b = gp * v_a
//   for j = 1..R: sa = sigmoid(dot(v_rj, v_a)); sb = sigmoid(dot(v_rj, v_b))
//                 g_a = g_a + sa * v_rj; g_b = g_b + sb * v_rj
//                 update_negatives: g_rj = sa * v_a + sb * v_b
//   then, in this order, each from the row's current value:
//   v_a = v_a - lr_t * g_a; v_b = v_b - lr_t * g_b; (update_negatives) v_rj = v_rj - lr_t * g_rj.
// The authors' code updates only v_a and v_b (update_negatives = false, the default);
// with update_negatives the step is plain SGD on the pair's full term of Eq. 1.
// A negative equal to a or b is kept (as in the authors' code).
//
// Reported per epoch: mean over pairs of the pair's term of Eq. 1 at the vectors it
// was visited with (double), and mean over pairs of sqrt(sum of |g|^2 over the
// updated vectors). Training stops after an epoch whose mean gradient norm is below
// tol (tol > 0), or whose loss is not finite (divergence; the caller reports it).
//
// Threads. threads == 1: plain loop, bit-reproducible. threads > 1: Hogwild (lock-free
// racy updates, as word2vec) over chunks of 16384 consecutive pairs of each epoch's
// list, handed out dynamically, with the GIL released; the shuffle stays serial so the pair order and negatives are the
// same as with one thread, only the interleaving of updates differs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// Bit-exact agreement with the NumPy oracle needs every a * b + c rounded twice:
// forbid fused multiply-add contraction here even when the build enables FMA
// (e.g. CONCEPTEVO_NATIVE_ARCH=1 -> -march=native; GCC contracts by default).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

// 8 x float32; GCC/Clang lower it to two SSE ops without -mavx. may_alias: it is
// loaded straight from the float rows.
typedef float v8f __attribute__((vector_size(32), aligned(32), may_alias));
constexpr int kLanes = 8;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int kMaxNegatives = 64;

inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
inline uint64_t stream_at(uint64_t state, uint64_t k) { return mix64(state + (k + 1) * kGolden); }
inline uint64_t stream_key(uint64_t seed, uint64_t tag, uint64_t epoch) {
    return mix64(mix64(mix64(seed) + tag) + epoch);
}
inline uint64_t below(uint64_t x, uint64_t n) { return ((x >> 32) * n) >> 32; }

typedef double v4d __attribute__((vector_size(32), aligned(32), may_alias));
typedef int64_t v4i __attribute__((vector_size(32), aligned(32), may_alias));
constexpr int kMaxDots = ((1 + 2 * kMaxNegatives) + 3) / 4 * 4;
constexpr v4d kOnes = {1.0, 1.0, 1.0, 1.0};

// exp(y) for y <= 0, four lanes, in double. Cody-Waite reduction y = k ln2 + r with
// k = rint(y / ln2) (via the 1.5 * 2^52 shift), |r| <= ln2 / 2, then the Taylor
// polynomial of degree 9 (relative error < 1e-11, far below float32 resolution) in
// Horner form, times 2^k built from the exponent bits. y is clamped at -700 (the
// sigmoid is then 0 in float32 anyway). Deterministic: the oracle repeats these
// exact double operations (numpy_reference_train / _exp_nonpos).
constexpr double kInvLn2 = 0x1.71547652b82fep+0;
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kShift = 0x1.8p52;
constexpr int64_t kShiftBits = 0x4338000000000000LL;  // bit pattern of kShift
constexpr double kMinExpArg = -700.0;

// (Arguments by reference: passing 32-byte vectors by value trips GCC's -Wpsabi
// note on the SSE2 build.)
inline void exp_nonpos(const v4d& y_in, v4d& out) {
    const v4d y = y_in < kMinExpArg ? kMinExpArg : y_in;  // NaN stays NaN (comparison false)
    const v4d t = y * kInvLn2 + kShift;
    const v4d kd = t - kShift;
    const v4d r = (y - kd * kLn2Hi) - kd * kLn2Lo;
    v4d p = r * (1.0 / 362880.0) + (1.0 / 40320.0);
    p = p * r + (1.0 / 5040.0);
    p = p * r + (1.0 / 720.0);
    p = p * r + (1.0 / 120.0);
    p = p * r + (1.0 / 24.0);
    p = p * r + (1.0 / 6.0);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const v4i k = reinterpret_cast<const v4i&>(t) - kShiftBits;
    const v4i bits = (k + 1023) << 52;
    out = p * reinterpret_cast<const v4d&>(bits);
}

inline float hsum(const v8f& acc) {
    const float h0 = acc[0] + acc[4], h1 = acc[1] + acc[5], h2 = acc[2] + acc[6], h3 = acc[3] + acc[7];
    const float q0 = h0 + h2, q1 = h1 + h3;
    return q0 + q1;
}

inline float dot(const float* x, const float* y, int nb) {
    const v8f* a = reinterpret_cast<const v8f*>(x);
    const v8f* b = reinterpret_cast<const v8f*>(y);
    v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < nb; ++k) acc = acc + a[k] * b[k];
    return hsum(acc);
}

struct AlignedFloats {
    float* ptr = nullptr;
    explicit AlignedFloats(size_t count) {
        const size_t bytes = ((count * sizeof(float) + 63) / 64) * 64;
        ptr = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
        if (!ptr) throw std::bad_alloc();
        std::memset(ptr, 0, bytes ? bytes : 64);
    }
    ~AlignedFloats() { std::free(ptr); }
    AlignedFloats(const AlignedFloats&) = delete;
    AlignedFloats& operator=(const AlignedFloats&) = delete;
};

struct Config {
    int64_t num_pairs;
    int64_t n;
    int dim, dp, nb, R;
    double lr;
    int epochs;
    bool lr_decay, update_negatives;
    const uint64_t* thr;  // alias thresholds (n,), nullptr = uniform
    const int32_t* alias;
};

struct EpochStats {
    double loss_sum = 0.0;
    double grad_sum = 0.0;
};

// The negatives of the pair at position `pos` (see the random streams above).
__attribute__((always_inline)) inline void draw_negatives(const Config& c, uint64_t neg_state, int64_t pos,
                                                          int64_t* neg) {
    for (int j = 0; j < c.R; ++j) {
        const uint64_t x = stream_at(neg_state, static_cast<uint64_t>(pos) * c.R + j);
        int64_t col = static_cast<int64_t>(below(x, static_cast<uint64_t>(c.n)));
        if (c.thr && (x & 0xffffffffULL) >= c.thr[col]) col = c.alias[col];
        neg[j] = col;
    }
}

__attribute__((always_inline)) inline void prefetch_row(const float* row, int dp) {
    for (int k = 0; k < dp; k += 16) __builtin_prefetch(row + k, 1, 3);
}

// Running loss of one thread: sum of the linear parts plus log of a product that is
// flushed through one log() only when it grows large (each factor is in [1, 2]).
struct LossAcc {
    double lin = 0.0, logs = 0.0, prod = 1.0;
    void flush() {
        logs += std::log(prod);
        prod = 1.0;
    }
    double total() {
        flush();
        return lin + logs;
    }
};

// One pair: the update documented at the top of the file. `scratch` holds
// (2 + R) * dp floats private to the calling thread.
__attribute__((always_inline)) inline void train_pair(const Config& c, float* W, uint64_t packed, int64_t pos,
                                                      int epoch, const int64_t* neg, float* scratch,
                                                      LossAcc& loss, double& grad_acc) {
    const int dp = c.dp, nb = c.nb, R = c.R;
    const int m = 1 + 2 * R;  // dot products: [s, da_1, db_1, ..., da_R, db_R]
    const int64_t ia = static_cast<int32_t>(static_cast<uint32_t>(packed));
    const int64_t ib = static_cast<int32_t>(static_cast<uint32_t>(packed >> 32));
    float* va = W + ia * dp;
    float* vb = W + ib * dp;
    const v8f* A = reinterpret_cast<const v8f*>(va);
    const v8f* B = reinterpret_cast<const v8f*>(vb);

    float lr_t;
    if (c.lr_decay) {
        const double done = static_cast<double>(static_cast<int64_t>(epoch) * c.num_pairs + pos) /
                            static_cast<double>(static_cast<int64_t>(c.epochs) * c.num_pairs);
        lr_t = static_cast<float>(c.lr * std::max(1e-4, 1.0 - done));
    } else {
        lr_t = static_cast<float>(c.lr);
    }

    // 1. All dot products, from the vectors before any write.
    alignas(32) double x[kMaxDots];
    x[0] = dot(va, vb, nb);
    for (int j = 0; j < R; ++j) {
        const float* vr = W + neg[j] * dp;
        x[1 + 2 * j] = dot(vr, va, nb);
        x[2 + 2 * j] = dot(vr, vb, nb);
    }
    const int m4 = (m + 3) & ~3;
    for (int i = m; i < m4; ++i) x[i] = 0.0;

    // 2. Sigmoids, four at a time; loss factors on the way.
    alignas(32) float sig[kMaxDots];
    double lin = std::max(-x[0], 0.0);
    for (int i = 1; i < m; ++i) lin += std::max(x[i], 0.0);
    double prod = 1.0;
    for (int i = 0; i < m4; i += 4) {
        const v4d xv = *reinterpret_cast<const v4d*>(x + i);
        const v4d neg_abs = xv < 0.0 ? xv : -xv;
        v4d e;
        exp_nonpos(neg_abs, e);
        const v4d sg = (xv >= 0.0 ? kOnes : e) / (1.0 + e);
        for (int l = 0; l < 4; ++l) sig[i + l] = static_cast<float>(sg[l]);
        const v4d f = 1.0 + e;
        for (int l = 0; l < 4 && i + l < m; ++l) prod *= f[l];
    }
    loss.lin += lin;
    loss.prod *= prod;
    if (loss.prod > 1e200) loss.flush();

    // 3. Gradients.
    v8f* ga = reinterpret_cast<v8f*>(scratch);
    v8f* gb = reinterpret_cast<v8f*>(scratch + dp);
    const float gp = sig[0] - 1.0f;
    for (int k = 0; k < nb; ++k) {
        ga[k] = gp * B[k];
        gb[k] = gp * A[k];
    }
    for (int j = 0; j < R; ++j) {
        const v8f* Rv = reinterpret_cast<const v8f*>(W + neg[j] * dp);
        const float sa = sig[1 + 2 * j], sb = sig[2 + 2 * j];
        for (int k = 0; k < nb; ++k) {
            ga[k] = ga[k] + sa * Rv[k];
            gb[k] = gb[k] + sb * Rv[k];
        }
        if (c.update_negatives) {
            v8f* gr = reinterpret_cast<v8f*>(scratch + (2 + j) * dp);
            for (int k = 0; k < nb; ++k) gr[k] = sa * A[k] + sb * B[k];
        }
    }

    // 4. Writes, in the documented order; each reads the row's current value.
    const int nupd = c.update_negatives ? 2 + R : 2;
    double g2 = 0.0;
    for (int u = 0; u < nupd; ++u) {
        float* row = u == 0 ? va : (u == 1 ? vb : W + neg[u - 2] * dp);
        v8f* V = reinterpret_cast<v8f*>(row);
        const v8f* G = reinterpret_cast<const v8f*>(scratch + u * dp);
        v8f sq = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int k = 0; k < nb; ++k) {
            V[k] = V[k] - lr_t * G[k];
            sq = sq + G[k] * G[k];
        }
        for (int l = 0; l < kLanes; ++l) g2 += sq[l];
    }
    grad_acc += std::sqrt(g2);
}

// The hot loop over a contiguous block of one epoch's pair list. On x86-64 Linux it
// is compiled twice (AVX2 and baseline SSE2) and picked at load time; both give the
// same bits because no FMA contraction is allowed (see the top of the file).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(CONCEPTEVO_NO_TARGET_CLONES)
__attribute__((target_clones("avx2", "default")))
#endif
void train_range(const Config& c, float* W, const uint64_t* work, int64_t begin, int64_t end, int epoch,
                 uint64_t neg_state, float* scratch, double& loss_acc, double& grad_acc) {
    LossAcc loss;
    // The rows of pair i + 1 (and its negatives, drawn one pair early) are prefetched
    // while pair i is trained: the table is read at random and is larger than L1.
    int64_t neg_buf[2][kMaxNegatives];
    if (begin < end) draw_negatives(c, neg_state, begin, neg_buf[0]);
    for (int64_t i = begin; i < end; ++i) {
        const int64_t* neg = neg_buf[(i - begin) & 1];
        if (i + 1 < end) {
            int64_t* next = neg_buf[(i + 1 - begin) & 1];
            draw_negatives(c, neg_state, i + 1, next);
            const uint64_t pk = work[i + 1];
            prefetch_row(W + static_cast<int64_t>(static_cast<uint32_t>(pk)) * c.dp, c.dp);
            prefetch_row(W + static_cast<int64_t>(static_cast<uint32_t>(pk >> 32)) * c.dp, c.dp);
            for (int j = 0; j < c.R; ++j) prefetch_row(W + next[j] * c.dp, c.dp);
        }
        train_pair(c, W, work[i], i, epoch, neg, scratch, loss, grad_acc);
    }
    loss_acc += loss.total();
}

// Fisher-Yates as documented at the top. The swap partners are drawn kAhead steps
// early and prefetched: the list is larger than the caches and the walk is serial.
void fisher_yates(uint64_t* a, int64_t P, uint64_t key) {
    constexpr int64_t kAhead = 16;
    auto partner = [&](int64_t i) {
        return static_cast<int64_t>(below(stream_at(key, static_cast<uint64_t>(P - 1 - i)), static_cast<uint64_t>(i + 1)));
    };
    int64_t ring[kAhead];
    for (int64_t i = P - 1; i > 0 && i > P - 1 - kAhead; --i) {
        ring[i % kAhead] = partner(i);
        __builtin_prefetch(a + ring[i % kAhead], 1, 3);
    }
    for (int64_t i = P - 1; i > 0; --i) {
        const int64_t j = ring[i % kAhead];
        const int64_t ahead = i - kAhead;
        if (ahead > 0) {
            ring[ahead % kAhead] = partner(ahead);
            __builtin_prefetch(a + ring[ahead % kAhead], 1, 3);
        }
        std::swap(a[i], a[j]);
    }
}

void check_array(const py::array& a, const char* name, const py::dtype& dt, const char* dtname, int ndim) {
    if (!a.dtype().is(dt)) {
        throw py::value_error(std::string("train_sgns: ") + name + " must have dtype " + dtname + ", got " +
                              std::string(py::str(a.dtype())));
    }
    if (a.ndim() != ndim) {
        throw py::value_error(std::string("train_sgns: ") + name + " must be " + std::to_string(ndim) +
                              "-D, got " + std::to_string(a.ndim()) + "-D");
    }
    if (!(a.flags() & py::array::c_style)) {
        throw py::value_error(std::string("train_sgns: ") + name + " must be C-contiguous");
    }
}

py::tuple train_sgns(py::array pairs, int64_t num_neurons, int dim, double lr, int negatives, int epochs,
                     bool lr_decay, uint64_t seed, int threads, double tol, py::object init, double init_range,
                     bool update_negatives, bool shuffle, py::object neg_threshold, py::object neg_alias,
                     py::object on_epoch) {
    // ---- validation (GIL held) ----
    check_array(pairs, "pairs", py::dtype::of<int32_t>(), "int32", 2);
    if (pairs.shape(1) != 2) {
        throw py::value_error("train_sgns: pairs must have shape (P, 2), got (" + std::to_string(pairs.shape(0)) +
                              ", " + std::to_string(pairs.shape(1)) + ")");
    }
    const int64_t P = pairs.shape(0);
    if (P < 1) throw py::value_error("train_sgns: pairs is empty; there is nothing to train on");
    if (P >= (int64_t(1) << 32)) throw py::value_error("train_sgns: more than 2^32 - 1 pairs are not supported");
    if (num_neurons < 1 || num_neurons >= (int64_t(1) << 31)) {
        throw py::value_error("train_sgns: num_neurons must be in [1, 2^31), got " + std::to_string(num_neurons));
    }
    if (dim < 1 || dim > 65536) throw py::value_error("train_sgns: dim must be in [1, 65536], got " + std::to_string(dim));
    if (!(lr > 0.0) || !std::isfinite(lr)) throw py::value_error("train_sgns: lr must be a finite number > 0");
    if (negatives < 0 || negatives > kMaxNegatives) {
        throw py::value_error("train_sgns: negatives must be in [0, " + std::to_string(kMaxNegatives) + "], got " +
                              std::to_string(negatives));
    }
    if (epochs < 0) throw py::value_error("train_sgns: epochs must be >= 0, got " + std::to_string(epochs));
    if (!(tol >= 0.0) || !std::isfinite(tol)) throw py::value_error("train_sgns: tol must be a finite number >= 0");
    if (!(init_range > 0.0) || !std::isfinite(init_range)) {
        throw py::value_error("train_sgns: init_range must be a finite number > 0");
    }
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#else
    threads = 1;
#endif

    const int32_t* pp = static_cast<const int32_t*>(pairs.data());
    for (int64_t i = 0; i < 2 * P; ++i) {
        if (pp[i] < 0 || pp[i] >= num_neurons) {
            std::ostringstream msg;
            msg << "train_sgns: pairs[" << i / 2 << ", " << i % 2 << "] = " << pp[i]
                << " is not a neuron id in [0, num_neurons=" << num_neurons << ")";
            throw py::value_error(msg.str());
        }
    }

    const uint64_t* thr = nullptr;
    const int32_t* alias = nullptr;
    py::array thr_arr, alias_arr;  // keep references alive
    if (neg_threshold.is_none() != neg_alias.is_none()) {
        throw py::value_error("train_sgns: neg_threshold and neg_alias must be given together (or both None)");
    }
    if (!neg_threshold.is_none()) {
        thr_arr = neg_threshold.cast<py::array>();
        alias_arr = neg_alias.cast<py::array>();
        check_array(thr_arr, "neg_threshold", py::dtype::of<uint64_t>(), "uint64", 1);
        check_array(alias_arr, "neg_alias", py::dtype::of<int32_t>(), "int32", 1);
        if (thr_arr.shape(0) != num_neurons || alias_arr.shape(0) != num_neurons) {
            throw py::value_error("train_sgns: neg_threshold and neg_alias must have num_neurons entries");
        }
        thr = static_cast<const uint64_t*>(thr_arr.data());
        alias = static_cast<const int32_t*>(alias_arr.data());
        for (int64_t i = 0; i < num_neurons; ++i) {
            if (thr[i] > (uint64_t(1) << 32) || alias[i] < 0 || alias[i] >= num_neurons) {
                throw py::value_error("train_sgns: alias table entry " + std::to_string(i) +
                                      " is out of range (threshold <= 2^32, alias in [0, num_neurons))");
            }
        }
    }

    const int dp = ((dim + kLanes - 1) / kLanes) * kLanes;
    const int nb = dp / kLanes;
    AlignedFloats W(static_cast<size_t>(num_neurons) * dp);

    if (!init.is_none()) {
        py::array ia = init.cast<py::array>();
        check_array(ia, "init", py::dtype::of<float>(), "float32", 2);
        if (ia.shape(0) != num_neurons || ia.shape(1) != dim) {
            throw py::value_error("train_sgns: init must have shape (num_neurons, dim) = (" +
                                  std::to_string(num_neurons) + ", " + std::to_string(dim) + ")");
        }
        const float* src = static_cast<const float*>(ia.data());
        for (int64_t i = 0; i < num_neurons; ++i) {
            for (int d = 0; d < dim; ++d) {
                const float v = src[i * dim + d];
                if (!std::isfinite(v)) {
                    throw py::value_error("train_sgns: init[" + std::to_string(i) + ", " + std::to_string(d) +
                                          "] is not finite");
                }
                W.ptr[i * dp + d] = v;
            }
        }
    } else {
        const uint64_t key = stream_key(seed, 1, 0);
        const float scale = static_cast<float>(init_range);
        for (int64_t i = 0; i < num_neurons; ++i) {
            for (int d = 0; d < dim; ++d) {
                const uint64_t x = stream_at(key, static_cast<uint64_t>(i) * dim + d);
                const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
                W.ptr[i * dp + d] = scale * (2.0f * u - 1.0f);
            }
        }
    }

    // Working copy of the pair list, one uint64 per pair (a in the low half).
    std::vector<uint64_t> work(P);
    for (int64_t i = 0; i < P; ++i) {
        work[i] = static_cast<uint64_t>(static_cast<uint32_t>(pp[2 * i])) |
                  (static_cast<uint64_t>(static_cast<uint32_t>(pp[2 * i + 1])) << 32);
    }

    Config cfg{P, num_neurons, dim, dp, nb, negatives, lr, epochs, lr_decay, update_negatives, thr, alias};
    const size_t scratch_floats = static_cast<size_t>(2 + negatives) * dp;
    std::vector<double> losses, grads;
    int epochs_run = 0;

    for (int e = 0; e < epochs; ++e) {
        EpochStats st;
        {
            py::gil_scoped_release nogil;
            if (shuffle) fisher_yates(work.data(), P, stream_key(seed, 2, static_cast<uint64_t>(e)));
            const uint64_t neg_state = stream_key(seed, 3, static_cast<uint64_t>(e));
            if (threads == 1) {
                AlignedFloats scratch(scratch_floats);
                train_range(cfg, W.ptr, work.data(), 0, P, e, neg_state, scratch.ptr, st.loss_sum, st.grad_sum);
            } else {
                constexpr int64_t kChunk = 16384;
                const int64_t num_chunks = (P + kChunk - 1) / kChunk;
                double loss_sum = 0.0, grad_sum = 0.0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : loss_sum, grad_sum)
#endif
                {
                    AlignedFloats scratch(scratch_floats);
                    // Chunks handed out dynamically: a thread slowed down by other work on
                    // its core does not hold the epoch up. Results do not depend on it.
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
                    for (int64_t ch = 0; ch < num_chunks; ++ch) {
                        const int64_t begin = ch * kChunk, end = std::min(P, begin + kChunk);
                        train_range(cfg, W.ptr, work.data(), begin, end, e, neg_state, scratch.ptr, loss_sum,
                                    grad_sum);
                    }
                }
                st.loss_sum = loss_sum;
                st.grad_sum = grad_sum;
            }
        }
        const double loss = st.loss_sum / static_cast<double>(P);
        const double gnorm = st.grad_sum / static_cast<double>(P);
        losses.push_back(loss);
        grads.push_back(gnorm);
        epochs_run = e + 1;
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
        if (!on_epoch.is_none()) {
            py::object keep = on_epoch(e, loss, gnorm);
            if (!keep.is_none() && PyObject_IsTrue(keep.ptr()) == 0) break;
        }
        if (!std::isfinite(loss) || !std::isfinite(gnorm)) break;
        if (tol > 0.0 && gnorm < tol) break;
    }

    py::array_t<float> vectors({static_cast<py::ssize_t>(num_neurons), static_cast<py::ssize_t>(dim)});
    float* out = vectors.mutable_data();
    for (int64_t i = 0; i < num_neurons; ++i) std::memcpy(out + i * dim, W.ptr + i * dp, sizeof(float) * dim);
    py::array_t<double> loss_arr(static_cast<py::ssize_t>(losses.size()));
    py::array_t<double> grad_arr(static_cast<py::ssize_t>(grads.size()));
    if (!losses.empty()) {
        std::memcpy(loss_arr.mutable_data(), losses.data(), sizeof(double) * losses.size());
        std::memcpy(grad_arr.mutable_data(), grads.data(), sizeof(double) * grads.size());
    }
    return py::make_tuple(vectors, loss_arr, grad_arr, epochs_run);
}

}  // namespace

void register_sgns(py::module_& m) {
    m.def("train_sgns", &train_sgns, py::arg("pairs"), py::arg("num_neurons"), py::arg("dim") = 30,
          py::arg("lr") = 0.05, py::arg("negatives") = 3, py::arg("epochs") = 5, py::arg("lr_decay") = false,
          py::arg("seed") = 0, py::arg("threads") = 0, py::arg("tol") = 0.0, py::arg("init") = py::none(),
          py::arg("init_range") = 0.5, py::arg("update_negatives") = false, py::arg("shuffle") = true,
          py::arg("neg_threshold") = py::none(), py::arg("neg_alias") = py::none(),
          py::arg("on_epoch") = py::none(),
          R"doc(Train neuron vectors on co-activated pairs with negative sampling (Eq. 1).

pairs: int32 (P, 2) C-contiguous neuron ids. Returns (vectors float32 (n, dim),
losses float64 (epochs_run,), grad_norms float64 (epochs_run,), epochs_run).
threads <= 0 uses every OpenMP thread. neg_threshold (uint64) / neg_alias (int32):
an alias table over neurons for the negative distribution (None = uniform).
on_epoch(epoch, loss, grad_norm) is called after each epoch; returning False stops.
The exact update, random streams and order are documented in csrc/sgns.cpp and
replicated by conceptevo.neuron_embedding.numpy_reference_train.)doc");
}
