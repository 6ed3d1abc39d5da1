// phi4's quantized matrix kernels: y = W·x for the K-quant weight types (Q2_K ... Q6_K, IQ4_XS,
// IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS) and Q4_0 / Q8_0, with every weight block unpacked once
// per step and applied to all the step's tokens.
//
// ggml's kernels take one token at a time through a weight block (vec_dot), or four (its
// repacked gemm): a step of several tokens costs nearly several steps. Here the weights are
// repacked at load into groups of 8 rows, 8 bytes of each row side by side, so that one 64-byte
// vector holds 8 consecutive weights of 8 rows. A dot product instruction (vpdpbusd, NEON's
// sdot; AVX2 emulates it) multiplies that vector with 8 bytes of one token broadcast, giving
// each row's partial sums in two 32-bit lanes: unpacked once, the vector serves up to 8 tokens
// from registers. The sub-block scales are applied per 8 rows at once, in float.
//
// One template over the ISA: the primitives below (a 64-byte vector, a dot of 8 bytes, float
// lanes) per ISA, and a scalar path over the same layout (the reference each ISA is tested
// against, with ggml's own product as the independent one in tests/kernels.rs).
//
// This file is compiled once per CPU variant of build.rs with the variant's flags (its
// symbols then prefixed), so every function here is the variant's own.
//
// Layouts (K = row length, a multiple of 256; one superblock = 256 weights of 8 rows):
//   activations, per token:  K/256 × mm_act (K-quants, IQ4_XS: ggml's Q8_K quantization, the
//                            same int8 values) or mm_act0 (Q4_0, Q8_0: ggml's Q8_0, eight
//                            blocks of 32)
//   weights, per 8-row group: K/256 × the type's packed superblock (below), rows past the
//   matrix's last zero.

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-quants.h" // ggml's blocks (block_q4_K, ...), QK_K, quantize_row_q8_K_ref
#define GGML_COMMON_IMPL_C
#include "ggml-common.h" // ggml's tables (the IQ3 and IQ2 grids, the IQ2 signs), this file's own copy as in ggml's CPU backend

// The CPU backend's Q8_0 quantizer (ggml-cpu's quants.h), in this variant's build: the tokens of a
// Q4_0 or Q8_0 product are quantized exactly as ggml's own product quantizes them.
void quantize_row_q8_0(const float *restrict x, void *restrict y, int64_t k);

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MM_X86 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define MM_NEON 1
#endif

#define QK QK_K // 256 weights: a superblock
#define ROWS 8   // rows per group
#define TOKENS 8 // tokens per register block
// Bytes of weights asked for ahead of use, into L2. The hardware's prefetchers alone leave a
// decode step (one token: little arithmetic per byte) waiting on memory. Measured on a 2-vCPU
// Zen 4: a 9 GB model decoded at 31 GB/s with 4 KiB ahead into L1, at 48 GB/s (the machine's
// read bandwidth) with 8 KiB into L2; one matrix ran slower with 12 or 16 KiB.
#define PREFETCH 8192

// Q8_0's weights are signed bytes, packed offset by 128 (unsigned) on every CPU. A dot product of
// unsigned × signed bytes that does not saturate (VNNI's) takes them so, the offset's share taken
// off through the activations' sums (mm_act0.corr); elsewhere they are made signed again
// (NEON's sdot is signed × signed; AVX2 without VNNI moves the weights' signs onto the tokens).
#if defined(MM_X86) && (defined(__AVX512VNNI__) || defined(__AVXVNNI__))
#define Q8_BIAS 128 // the offset the dot product sees
#else
#define Q8_BIAS 0
#endif

// ---- formats -------------------------------------------------------------------------------

// One token's superblock of activations: ggml's Q8_K values, and the sums the mins need.
typedef struct {
    int8_t qs[QK];
    float d;
    float bs16[16]; // sums of qs over each 16
    float bs32[8];  // ... over each 32
    int32_t off16[16]; // Q6_K, Q3_K: -(the values' offset) × bs16 / 2, each lane's share of a
                       // sub-block's offset (the kernels start its sums there)
    float pad[7];
} mm_act; // 448 bytes

// Q4_0's and Q8_0's tokens: ggml's Q8_0 values, eight blocks of 32 per superblock.
typedef struct {
    int8_t qs[QK];
    float d[8];         // each block's scale (ggml's f16, as float)
    int32_t corr[8][2]; // -(the weights' offset) × the sum of the 16 values each lane of a row
                        // meets in the block: the first 4 of each 8 (even lanes), the last 4 (odd)
    float pad[24];
} mm_act0; // 448 bytes, as mm_act

_Static_assert(sizeof(mm_act0) == sizeof(mm_act), "one activation size for every type");

// The file's bytes go over unchanged (only reordered): Q4_K's and Q5_K's byte i of a 32-byte
// run holds weights i and i + 32 of a 64-weight half, Q5_K's high bits byte i those of weight i
// of every sub-block.
// Packed superblocks of 8 rows. `nib[p][k8][8*r + j]`: weight 8*k8+j of row r in sub-block 2p
// (low nibble) and 2p+1 (high nibble): 64 bytes hold 8 weights of each of the 8 rows, one
// AVX-512 register (two AVX2 ones, four NEON ones), each row's 8 bytes two 32-bit lanes.
typedef struct {
    uint8_t nib[4][4][64];
    uint8_t sc[8][8]; // [sub-block][row]
    uint8_t m[8][8];
    uint16_t d[8], dmin[8];
} mm_q4k; // 1184 bytes = 8 × 148 (the source: 8 × 144)

// Q5_K: Q4_K's layout, then the fifth bits.
typedef struct {
    mm_q4k q4;
    uint8_t hb[4][64]; // [k8][8*r + j]: bit b = the fifth bit of sub-block b's weight
} mm_q5k; // 1440 = 8 × 180 (8 × 176)

// Q6_K's sub-blocks are 16 weights, paired as the file pairs them: `nib[p][k8]` holds
// sub-blocks 8(p/4) + p%4 (low nibble) and that + 4 (high); `h2[q][k8]` the top two bits of
// sub-blocks 8(q/2) + q%2 + {0, 2, 4, 6}, two bits each.
typedef struct {
    uint8_t nib[8][2][64];
    uint8_t h2[4][2][64];
    int8_t sc[16][8];
    uint16_t d[8];
} mm_q6k; // 1680 = 8 × 210 (8 × 210)

// Q2_K and Q3_K: the 2-bit values as the file holds them, byte i of a 32-byte run n holding
// weight i % 16 of sub-blocks 8n + 2j + i / 16 at bits 2j (j = 0..3): `q[n][k8][8*r + j]`.
// Q2_K's scale and min bytes as the file's (scale in the low nibble).
typedef struct {
    uint8_t q[2][4][64];
    uint8_t scm[16][8]; // [sub-block][row]
    uint16_t d[8], dmin[8];
} mm_q2k; // 672 = 8 × 84 (8 × 84)

// Q3_K: Q2_K's low bits, the high bits (hmask: bit 4n + j of byte i, as Q2_K's values), the
// 6-bit scales unpacked (minus 32).
typedef struct {
    uint8_t q[2][4][64];
    uint8_t h[4][64];
    int8_t sc[16][8];
    uint16_t d[8];
} mm_q3k; // 912 = 8 × 114 (8 × 110)

// IQ4_XS: the file's 4-bit indices into IQ4_NL's codebook, per sub-block of 32: byte j of
// `nib[sb][k8]` holds indices 8*k8 + j (low nibble) and 16 + 8*k8 + j (high); the 6-bit scales
// unpacked (minus 32).
typedef struct {
    uint8_t nib[8][2][64];
    int8_t sc[8][8];
    uint16_t d[8];
} mm_iq4xs; // 1104 = 8 × 138 (8 × 136)

// IQ4_NL's codebook (the format's), and as the kernels read it: offset by 128 where the dot
// product takes unsigned weights (the offset taken off through mm_act.off16, as Q8_0's).
static const int8_t IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ3_S: per 8 weights of a row (an octet: 32 per superblock, octet 4sb + l holding weights 8l..8l+7
// of sub-block sb) the file's two 9-bit indices into its grid of 4 magnitudes and 8 sign bits:
// `lo[o][2r + j]` the low 8 bits of index j of row r, bit 2r + j of `hi[o]` the ninth,
// `sg[o][r]` the signs (bit i: weight i). The 4-bit scales as the odd factor 1 + 2s.
typedef struct {
    uint8_t lo[32][16];
    uint16_t hi[32];
    uint8_t sg[32][8];
    int8_t sc[8][8]; // [sub-block][row]
    uint16_t d[8];
} mm_iq3s; // 912 = 8 × 114 (8 × 110)

// IQ3_XXS: IQ3_S's layout with 8-bit indices into its own grid (no ninth bits), the signs
// expanded from the file's 7 bits (the eighth is their parity), the scales as 1 + 2s (the
// file's d × (0.5 + s) / 2 is d/4 × (1 + 2s)).
typedef struct {
    uint8_t lo[32][16];
    uint8_t sg[32][8];
    int8_t sc[8][8];
    uint16_t d[8];
} mm_iq3xxs; // 848 = 8 × 106 (8 × 98)
#define IQ3XXS_DMUL 0.25f // d's factor beside the scales' 1 + 2s

// IQ2_XS and IQ2_S: per octet (as IQ3's) one index into the type's grid of 8 magnitudes, 9 bits
// (IQ2_XS) or 10 (IQ2_S), and 8 sign bits: `lo[o][r]` the low 8 bits of row r's index, bits 2r
// and 2r + 1 of `hi[o]` the ninth and tenth, `sg[o][r]` the signs (IQ2_XS's expanded from the
// file's 7 bits, as IQ3_XXS's). The 4-bit scales of each sub-block of 32 as the file has them:
// the first 16 weights' in the low nibble, the last 16's in the high.
typedef struct {
    uint8_t lo[32][8];
    uint16_t hi[32];
    uint8_t sg[32][8];
    uint8_t sc[8][8]; // [sub-block][row]
    uint16_t d[8];
} mm_iq2; // 656 = 8 × 82 (IQ2_S: 8 × 82, IQ2_XS: 8 × 74)

// IQ2_XXS: 8-bit indices (no high bits), one scale per 32 as the odd factor 1 + 2s (as IQ3's).
typedef struct {
    uint8_t lo[32][8];
    uint8_t sg[32][8];
    int8_t sc[8][8];
    uint16_t d[8];
} mm_iq2xxs; // 592 = 8 × 74 (8 × 66)
#define IQ2_DMUL 0.125f // the IQ2 types' d × (0.5 + s) / 4 is d/8 × (1 + 2s)

// IQ2_XS's and IQ2_S's scale of row r's sub-block sb (of 16) as the odd factor 1 + 2s.
static int iq2_scale(const mm_iq2 *b, int sb, int r) {
    return 1 + 2 * ((b->sc[sb / 2][r] >> (4 * (sb % 2))) & 0xF);
}

// A grid-coded superblock unpacked (by the vector paths, for a step of many tokens): octet o's
// 64 bytes as the dot products take them, the scales as odd factors (per 32: the first 8 rows
// of `sc`; IQ2_XS's and IQ2_S's per 16), d as packed, d's factor.
typedef struct {
    uint8_t v[32][64];
    int8_t sc[16][8];
    uint16_t d[8];
    float dmul;
} mm_grid_unpacked;

// Q4_0: eight blocks of 32; byte j of `q[blk][k8]` holds weights 8*k8 + j (low nibble) and
// 16 + 8*k8 + j (high) of the block. Q8_0: its bytes in order, offset by 128.
typedef struct {
    uint8_t q[8][2][64];
    uint16_t d[8][8]; // [block][row]
} mm_q40; // 1152 = 8 × 144 (8 × 144)

typedef struct {
    uint8_t q[8][4][64];
    uint16_t d[8][8];
} mm_q80; // 2176 = 8 × 272 (8 × 272)

// The offset in the packed values that the vector paths' dot products see, taken off through
// the tokens' sums (mm_act0.corr, mm_act.off16): Q4_0's and Q3_K's unsigned values, Q6_K's, and
// Q8_0's and IQ4_XS's signed ones where VNNI takes them unsigned (Q8_BIAS).
static int dot_offset(int type) {
    switch (type) {
    case GGML_TYPE_Q4_0: return 8;
    case GGML_TYPE_Q3_K: return 4;
    case GGML_TYPE_Q6_K: return 32;
    case GGML_TYPE_Q8_0:
    case GGML_TYPE_IQ4_XS:
    case GGML_TYPE_IQ3_S:
    case GGML_TYPE_IQ3_XXS:
    case GGML_TYPE_IQ2_S:
    case GGML_TYPE_IQ2_XS:
    case GGML_TYPE_IQ2_XXS: return Q8_BIAS;
    default: return 0;
    }
}

static int is_type0(int type) { return type == GGML_TYPE_Q4_0 || type == GGML_TYPE_Q8_0; }

static int is_iq2(int type) {
    return type == GGML_TYPE_IQ2_S || type == GGML_TYPE_IQ2_XS || type == GGML_TYPE_IQ2_XXS;
}

// The types whose octets index a grid of magnitudes.
static int is_grid(int type) {
    return type == GGML_TYPE_IQ3_S || type == GGML_TYPE_IQ3_XXS || is_iq2(type);
}

static void scale_min_k4(int j, const uint8_t *q, uint8_t *d, uint8_t *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Bytes of a file's superblock (type-0 formats: eight blocks).
static size_t src_block_size(int type) {
    switch (type) {
    case GGML_TYPE_IQ4_XS: return sizeof(block_iq4_xs);
    case GGML_TYPE_IQ3_S: return sizeof(block_iq3_s);
    case GGML_TYPE_IQ3_XXS: return sizeof(block_iq3_xxs);
    case GGML_TYPE_IQ2_S: return sizeof(block_iq2_s);
    case GGML_TYPE_IQ2_XS: return sizeof(block_iq2_xs);
    case GGML_TYPE_IQ2_XXS: return sizeof(block_iq2_xxs);
    case GGML_TYPE_Q2_K: return sizeof(block_q2_K);
    case GGML_TYPE_Q3_K: return sizeof(block_q3_K);
    case GGML_TYPE_Q4_0: return 8 * sizeof(block_q4_0);
    case GGML_TYPE_Q8_0: return 8 * sizeof(block_q8_0);
    case GGML_TYPE_Q4_K: return sizeof(block_q4_K);
    case GGML_TYPE_Q5_K: return sizeof(block_q5_K);
    case GGML_TYPE_Q6_K: return sizeof(block_q6_K);
    default: return 0;
    }
}

static size_t packed_block_size(int type) {
    switch (type) {
    case GGML_TYPE_IQ4_XS: return sizeof(mm_iq4xs);
    case GGML_TYPE_IQ3_S: return sizeof(mm_iq3s);
    case GGML_TYPE_IQ3_XXS: return sizeof(mm_iq3xxs);
    case GGML_TYPE_IQ2_S:
    case GGML_TYPE_IQ2_XS: return sizeof(mm_iq2);
    case GGML_TYPE_IQ2_XXS: return sizeof(mm_iq2xxs);
    case GGML_TYPE_Q2_K: return sizeof(mm_q2k);
    case GGML_TYPE_Q3_K: return sizeof(mm_q3k);
    case GGML_TYPE_Q4_0: return sizeof(mm_q40);
    case GGML_TYPE_Q8_0: return sizeof(mm_q80);
    case GGML_TYPE_Q4_K: return sizeof(mm_q4k);
    case GGML_TYPE_Q5_K: return sizeof(mm_q5k);
    case GGML_TYPE_Q6_K: return sizeof(mm_q6k);
    default: return 0;
    }
}

// Bytes of one packed group of 8 rows of length k (0: a type or length these kernels do not take).
size_t phi4_mm_group_size(int type, int64_t k) {
    if (k <= 0 || k % QK) {
        return 0;
    }
    return packed_block_size(type) * (size_t)(k / QK);
}

// Bytes of one token's activations of length k.
size_t phi4_mm_act_size(int64_t k) {
    return k > 0 && k % QK == 0 ? sizeof(mm_act) * (size_t)(k / QK) : 0;
}

// Q3_K's scale j (0..15) from the file's 12 bytes: the low 4 bits, then the high 2.
static int8_t scale_q3k(int j, const uint8_t *s) {
    const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4, hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    return (int8_t)((lo | hi << 4) - 32);
}

// Row r of a packed superblock from a file's block.
static void pack_block(int type, const uint8_t *src, uint8_t *dst, int r) {
    if (type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K) {
        const int three = type == GGML_TYPE_Q3_K;
        const block_q2_K *b2 = (const block_q2_K *)src;
        const block_q3_K *b3 = (const block_q3_K *)src;
        uint8_t(*q)[4][64] = three ? ((mm_q3k *)dst)->q : ((mm_q2k *)dst)->q;
        for (int n = 0; n < 2; n++) {
            for (int k8 = 0; k8 < 4; k8++) {
                memcpy(&q[n][k8][8 * r], (three ? b3->qs : b2->qs) + 32 * n + 8 * k8, 8);
            }
        }
        if (three) {
            mm_q3k *p = (mm_q3k *)dst;
            for (int k8 = 0; k8 < 4; k8++) {
                memcpy(&p->h[k8][8 * r], b3->hmask + 8 * k8, 8);
            }
            for (int j = 0; j < 16; j++) {
                p->sc[j][r] = scale_q3k(j, b3->scales);
            }
            p->d[r] = b3->d;
        } else {
            mm_q2k *p = (mm_q2k *)dst;
            for (int j = 0; j < 16; j++) {
                p->scm[j][r] = b2->scales[j];
            }
            p->d[r] = b2->d;
            p->dmin[r] = b2->dmin;
        }
    } else if (type == GGML_TYPE_IQ4_XS) {
        const block_iq4_xs *b = (const block_iq4_xs *)src;
        mm_iq4xs *p = (mm_iq4xs *)dst;
        for (int sb = 0; sb < 8; sb++) {
            for (int k8 = 0; k8 < 2; k8++) {
                memcpy(&p->nib[sb][k8][8 * r], b->qs + 16 * sb + 8 * k8, 8);
            }
            const int ls = ((b->scales_l[sb / 2] >> (4 * (sb % 2))) & 0xF) | (((b->scales_h >> (2 * sb)) & 3) << 4);
            p->sc[sb][r] = (int8_t)(ls - 32);
        }
        p->d[r] = b->d;
    } else if (type == GGML_TYPE_IQ3_S) {
        const block_iq3_s *b = (const block_iq3_s *)src;
        mm_iq3s *p = (mm_iq3s *)dst;
        for (int o = 0; o < 32; o++) {
            const int sb = o / 4, l = o % 4;
            const unsigned h = (b->qh[sb] >> (2 * l)) & 3; // row r's two ninth bits
            p->lo[o][2 * r] = b->qs[8 * sb + 2 * l];
            p->lo[o][2 * r + 1] = b->qs[8 * sb + 2 * l + 1];
            p->hi[o] = (uint16_t)((p->hi[o] & ~(3u << (2 * r))) | h << (2 * r));
            p->sg[o][r] = b->signs[4 * sb + l];
        }
        for (int sb = 0; sb < 8; sb++) {
            p->sc[sb][r] = (int8_t)(1 + 2 * ((b->scales[sb / 2] >> (4 * (sb % 2))) & 0xF));
        }
        p->d[r] = b->d;
    } else if (type == GGML_TYPE_IQ3_XXS) {
        const block_iq3_xxs *b = (const block_iq3_xxs *)src;
        mm_iq3xxs *p = (mm_iq3xxs *)dst;
        for (int sb = 0; sb < 8; sb++) {
            uint32_t aux; // 4 × 7 sign bits, then the scale
            memcpy(&aux, b->qs + QK / 4 + 4 * sb, 4);
            for (int l = 0; l < 4; l++) {
                const int o = 4 * sb + l;
                p->lo[o][2 * r] = b->qs[8 * sb + 2 * l];
                p->lo[o][2 * r + 1] = b->qs[8 * sb + 2 * l + 1];
                p->sg[o][r] = ksigns_iq2xs[(aux >> (7 * l)) & 127];
            }
            p->sc[sb][r] = (int8_t)(1 + 2 * (aux >> 28));
        }
        p->d[r] = b->d;
    } else if (type == GGML_TYPE_IQ2_XXS) {
        const block_iq2_xxs *b = (const block_iq2_xxs *)src;
        mm_iq2xxs *p = (mm_iq2xxs *)dst;
        for (int sb = 0; sb < 8; sb++) {
            uint8_t idx[4];
            uint32_t aux; // 4 × 7 sign bits, then the scale
            memcpy(idx, b->qs + 4 * sb, 4);
            memcpy(&aux, b->qs + 4 * sb + 2, 4);
            for (int l = 0; l < 4; l++) {
                p->lo[4 * sb + l][r] = idx[l];
                p->sg[4 * sb + l][r] = ksigns_iq2xs[(aux >> (7 * l)) & 127];
            }
            p->sc[sb][r] = (int8_t)(1 + 2 * (aux >> 28));
        }
        p->d[r] = b->d;
    } else if (type == GGML_TYPE_IQ2_XS || type == GGML_TYPE_IQ2_S) {
        const int xs = type == GGML_TYPE_IQ2_XS;
        const block_iq2_xs *bx = (const block_iq2_xs *)src;
        const block_iq2_s *bs = (const block_iq2_s *)src;
        mm_iq2 *p = (mm_iq2 *)dst;
        for (int o = 0; o < 32; o++) {
            // the index's high bits and the signs, from the file's 9 + 7 bits or 8 + 2 + 8
            const unsigned h = xs ? (bx->qs[o] >> 8) & 1 : (bs->qh[o / 4] >> (2 * (o % 4))) & 3;
            p->lo[o][r] = xs ? (uint8_t)bx->qs[o] : bs->qs[o];
            p->hi[o] = (uint16_t)((p->hi[o] & ~(3u << (2 * r))) | h << (2 * r));
            p->sg[o][r] = xs ? ksigns_iq2xs[bx->qs[o] >> 9] : bs->qs[QK / 8 + o];
        }
        for (int sb = 0; sb < 8; sb++) {
            p->sc[sb][r] = xs ? bx->scales[sb] : bs->scales[sb];
        }
        p->d[r] = xs ? bx->d : bs->d;
    } else if (type == GGML_TYPE_Q4_0) {
        const block_q4_0 *b = (const block_q4_0 *)src;
        mm_q40 *p = (mm_q40 *)dst;
        for (int blk = 0; blk < 8; blk++) {
            for (int k8 = 0; k8 < 2; k8++) {
                memcpy(&p->q[blk][k8][8 * r], b[blk].qs + 8 * k8, 8);
            }
            p->d[blk][r] = b[blk].d;
        }
    } else if (type == GGML_TYPE_Q8_0) {
        const block_q8_0 *b = (const block_q8_0 *)src;
        mm_q80 *p = (mm_q80 *)dst;
        for (int blk = 0; blk < 8; blk++) {
            for (int k8 = 0; k8 < 4; k8++) {
                for (int j = 0; j < 8; j++) {
                    p->q[blk][k8][8 * r + j] = (uint8_t)(b[blk].qs[8 * k8 + j] + 128);
                }
            }
            p->d[blk][r] = b[blk].d;
        }
    } else if (type == GGML_TYPE_Q4_K || type == GGML_TYPE_Q5_K) {
        const int five = type == GGML_TYPE_Q5_K;
        const block_q4_K *b4 = (const block_q4_K *)src;
        const block_q5_K *b5 = (const block_q5_K *)src;
        mm_q4k *p = (mm_q4k *)dst; // Q5_K's starts with Q4_K's
        const uint8_t *qs = five ? b5->qs : b4->qs, *scales = five ? b5->scales : b4->scales;
        for (int pr = 0; pr < 4; pr++) {
            for (int k8 = 0; k8 < 4; k8++) {
                memcpy(&p->nib[pr][k8][8 * r], qs + 32 * pr + 8 * k8, 8);
            }
        }
        for (int j = 0; j < 8; j++) {
            scale_min_k4(j, scales, &p->sc[j][r], &p->m[j][r]);
        }
        p->d[r] = five ? b5->d : b4->d;
        p->dmin[r] = five ? b5->dmin : b4->dmin;
        if (five) {
            for (int k8 = 0; k8 < 4; k8++) {
                memcpy(&((mm_q5k *)dst)->hb[k8][8 * r], b5->qh + 8 * k8, 8);
            }
        }
    } else {
        const block_q6_K *b = (const block_q6_K *)src;
        mm_q6k *p = (mm_q6k *)dst;
        for (int pr = 0; pr < 8; pr++) {
            for (int k8 = 0; k8 < 2; k8++) {
                memcpy(&p->nib[pr][k8][8 * r], b->ql + 64 * (pr / 4) + 16 * (pr % 4) + 8 * k8, 8);
            }
        }
        for (int q = 0; q < 4; q++) {
            for (int k8 = 0; k8 < 2; k8++) {
                memcpy(&p->h2[q][k8][8 * r], b->qh + 16 * q + 8 * k8, 8);
            }
        }
        for (int j = 0; j < 16; j++) {
            p->sc[j][r] = b->scales[j];
        }
        p->d[r] = b->d;
    }
}

// Pack groups [g0, g1) of a matrix of `nrows` rows of length `k` (GGUF layout at `src`, rows
// `row_bytes` apart) into `dst` (the packed matrix: group g at g × phi4_mm_group_size).
void phi4_mm_pack(int type, const void *src, size_t row_bytes, int64_t nrows, int64_t k,
                  void *dst, int64_t g0, int64_t g1) {
    const int64_t nb = k / QK;
    const size_t sbs = src_block_size(type), pbs = packed_block_size(type);
    for (int64_t g = g0; g < g1; g++) {
        uint8_t *gdst = (uint8_t *)dst + (size_t)g * pbs * (size_t)nb;
        if ((g + 1) * ROWS > nrows) {
            memset(gdst, 0, pbs * (size_t)nb); // rows past the matrix: d = 0, values 0
        }
        for (int r = 0; r < ROWS && g * ROWS + r < nrows; r++) {
            const uint8_t *row = (const uint8_t *)src + (size_t)(g * ROWS + r) * row_bytes;
            for (int64_t b = 0; b < nb; b++) {
                pack_block(type, row + (size_t)b * sbs, gdst + (size_t)b * pbs, r);
            }
        }
    }
}

// One superblock of a token for a type-0 weight format: ggml's Q8_0 blocks, and the sums each
// lane meets, times the weights' offset.
static void quantize0(int type, const float *x, mm_act0 *a) {
    const int offset = dot_offset(type);
    block_q8_0 blk[8];
    quantize_row_q8_0(x, blk, QK);
    memset(a, 0, sizeof *a);
    for (int b = 0; b < 8; b++) {
        memcpy(a->qs + 32 * b, blk[b].qs, 32);
        a->d[b] = ggml_fp16_to_fp32(blk[b].d);
        for (int i = 0; i < 32; i++) {
            a->corr[b][i % 8 / 4] -= offset * blk[b].qs[i];
        }
    }
}

// Quantize tokens [t0, t1) of x (rows `x_stride` bytes apart, length k) into `q` (token t at
// t × phi4_mm_act_size(k)) for a product with weights of `type`: ggml's Q8_K
// (quantize_row_q8_K_ref, what its CPU backend uses) with the sums the mins need as floats, or
// for Q4_0 and Q8_0 its Q8_0.
void phi4_mm_quantize(int type, const float *x, size_t x_stride, int64_t k, void *q, int64_t t0,
                      int64_t t1) {
    const int64_t nb = k / QK;
    for (int64_t t = t0; t < t1; t++) {
        const float *xr = (const float *)((const char *)x + (size_t)t * x_stride);
        mm_act *a = (mm_act *)q + (size_t)t * (size_t)nb;
        for (int64_t b = 0; b < nb; b++, xr += QK, a++) {
            if (is_type0(type)) {
                quantize0(type, xr, (mm_act0 *)a);
                continue;
            }
            block_q8_K blk;
            quantize_row_q8_K_ref(xr, &blk, QK);
            memset(a, 0, sizeof *a);
            memcpy(a->qs, blk.qs, QK);
            a->d = blk.d;
            const int half_offset = dot_offset(type) / 2; // each of a row's two lanes
            for (int j = 0; j < 16; j++) {
                a->bs16[j] = blk.bsums[j];
                a->off16[j] = -half_offset * blk.bsums[j];
            }
            for (int j = 0; j < 8; j++) {
                a->bs32[j] = a->bs16[2 * j] + a->bs16[2 * j + 1];
            }
        }
    }
}

// ---- the scalar path (every ISA's reference) ---------------------------------------------------

// Weight w (0..256) of row r of a packed superblock, unsigned (Q6_K's -32, Q3_K's -4 and Q4_0's
// -8 left out); Q8_0's, IQ4_XS's and the grid types' signed.
static int packed_weight(int type, const uint8_t *p, int r, int w) {
    if (type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K) {
        const int three = type == GGML_TYPE_Q3_K;
        const uint8_t(*q)[4][64] = three ? ((const mm_q3k *)p)->q : ((const mm_q2k *)p)->q;
        const int n = w / 128, j = w % 128 / 32, i = w % 32, k8 = i / 8, jj = i % 8;
        int v = (q[n][k8][8 * r + jj] >> (2 * j)) & 3;
        if (three) {
            v |= ((((const mm_q3k *)p)->h[k8][8 * r + jj] >> (4 * n + j)) & 1) << 2;
        }
        return v;
    }
    if (type == GGML_TYPE_IQ4_XS) {
        const int sb = w / 32, i = w % 32;
        return IQ4NL[(((const mm_iq4xs *)p)->nib[sb][i % 16 / 8][8 * r + i % 8] >> (4 * (i / 16))) & 0xF];
    }
    if (type == GGML_TYPE_IQ3_S || type == GGML_TYPE_IQ3_XXS) {
        const int o = w / 8, i = w % 8, lane = 2 * r + i / 4;
        int v, sign;
        if (type == GGML_TYPE_IQ3_S) {
            const mm_iq3s *b = (const mm_iq3s *)p;
            v = (int)(iq3s_grid[b->lo[o][lane] | ((b->hi[o] >> lane) & 1) << 8] >> (8 * (i % 4))) & 0xFF;
            sign = (b->sg[o][r] >> i) & 1;
        } else {
            const mm_iq3xxs *b = (const mm_iq3xxs *)p;
            v = (int)(iq3xxs_grid[b->lo[o][lane]] >> (8 * (i % 4))) & 0xFF;
            sign = (b->sg[o][r] >> i) & 1;
        }
        return sign ? -v : v;
    }
    if (is_iq2(type)) {
        const int o = w / 8, i = w % 8;
        uint64_t g;
        uint8_t sign;
        if (type == GGML_TYPE_IQ2_XXS) {
            const mm_iq2xxs *b = (const mm_iq2xxs *)p;
            g = iq2xxs_grid[b->lo[o][r]], sign = b->sg[o][r];
        } else {
            const mm_iq2 *b = (const mm_iq2 *)p;
            const unsigned index = b->lo[o][r] | ((b->hi[o] >> (2 * r)) & 3) << 8;
            g = type == GGML_TYPE_IQ2_XS ? iq2xs_grid[index] : iq2s_grid[index];
            sign = b->sg[o][r];
        }
        const int v = (int)(g >> (8 * i)) & 0xFF;
        return (sign >> i) & 1 ? -v : v;
    }
    if (type == GGML_TYPE_Q4_0) {
        const int blk = w / 32, i = w % 32;
        return (((const mm_q40 *)p)->q[blk][i % 16 / 8][8 * r + i % 8] >> (4 * (i / 16))) & 0xF;
    }
    if (type == GGML_TYPE_Q8_0) {
        const uint8_t v = ((const mm_q80 *)p)->q[w / 32][w % 32 / 8][8 * r + w % 8];
        return (int)v - 128;
    }
    if (type == GGML_TYPE_Q6_K) {
        const mm_q6k *b = (const mm_q6k *)p;
        const int n = w / 128, wi = w % 128, hi = wi >= 64, l = wi % 64;
        const int i = l / 16, k8 = l % 16 / 8, j = l % 8;
        const int lo4 = (b->nib[4 * n + i][k8][8 * r + j] >> (4 * hi)) & 0xF;
        const int top = (b->h2[2 * n + i % 2][k8][8 * r + j] >> (4 * hi + 2 * (i / 2))) & 3;
        return lo4 | top << 4;
    }
    const mm_q4k *b = (const mm_q4k *)p; // Q5_K's starts with Q4_K's
    const int pr = w / 64, hi = w % 64 >= 32, l = w % 32, k8 = l / 8, j = l % 8;
    int v = (b->nib[pr][k8][8 * r + j] >> (4 * hi)) & 0xF;
    if (type == GGML_TYPE_Q5_K) {
        v |= ((((const mm_q5k *)p)->hb[k8][8 * r + j] >> (w / 32)) & 1) << 4;
    }
    return v;
}

// y[t][2r] += over one superblock of Q4_0 or Q8_0, for n tokens.
static void block_scalar0(int type, const uint8_t *p, const mm_act0 *const *a, int n,
                          float (*y)[2 * ROWS]) {
    const uint16_t(*d)[8] = type == GGML_TYPE_Q4_0 ? ((const mm_q40 *)p)->d : ((const mm_q80 *)p)->d;
    const int offset = type == GGML_TYPE_Q4_0 ? 8 : 0;
    for (int r = 0; r < ROWS; r++) {
        for (int t = 0; t < n; t++) {
            for (int blk = 0; blk < 8; blk++) {
                int s = 0;
                for (int i = 0; i < 32; i++) {
                    s += (packed_weight(type, p, r, 32 * blk + i) - offset) * a[t]->qs[32 * blk + i];
                }
                y[t][2 * r] += ggml_fp16_to_fp32(d[blk][r]) * a[t]->d[blk] * (float)s;
            }
        }
    }
}

// y[t][2r] += over one superblock, for n tokens.
static void block_scalar(int type, const uint8_t *p, const mm_act *const *a, int n, float (*y)[2 * ROWS]) {
    if (is_type0(type)) {
        block_scalar0(type, p, (const mm_act0 *const *)a, n, y);
        return;
    }
    const int six = type == GGML_TYPE_Q6_K || type == GGML_TYPE_Q3_K || type == GGML_TYPE_Q2_K ||
                    type == GGML_TYPE_IQ4_XS || is_grid(type);
    const int nsub = six ? 16 : 8, len = QK / nsub;
    for (int r = 0; r < ROWS; r++) {
        float d, dmin;
        int sc[16], m[16];
        if (type == GGML_TYPE_Q2_K) {
            const mm_q2k *b = (const mm_q2k *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = b->scm[sb][r] & 0xF, m[sb] = b->scm[sb][r] >> 4;
            }
            d = ggml_fp16_to_fp32(b->d[r]);
            dmin = ggml_fp16_to_fp32(b->dmin[r]);
        } else if (type == GGML_TYPE_IQ4_XS) { // sub-blocks of 32 as two of 16; no offset
            const mm_iq4xs *b = (const mm_iq4xs *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = b->sc[sb / 2][r], m[sb] = 0;
            }
            d = dmin = ggml_fp16_to_fp32(b->d[r]);
        } else if (type == GGML_TYPE_IQ3_S || type == GGML_TYPE_IQ3_XXS) { // as IQ4_XS
            const int xxs = type == GGML_TYPE_IQ3_XXS;
            const int8_t(*s)[8] = xxs ? ((const mm_iq3xxs *)p)->sc : ((const mm_iq3s *)p)->sc;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = s[sb / 2][r], m[sb] = 0;
            }
            d = dmin = ggml_fp16_to_fp32(xxs ? ((const mm_iq3xxs *)p)->d[r] : ((const mm_iq3s *)p)->d[r]) *
                       (xxs ? IQ3XXS_DMUL : 1.0f);
        } else if (type == GGML_TYPE_IQ2_XXS) { // as IQ3_XXS
            const mm_iq2xxs *b = (const mm_iq2xxs *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = b->sc[sb / 2][r], m[sb] = 0;
            }
            d = dmin = ggml_fp16_to_fp32(b->d[r]) * IQ2_DMUL;
        } else if (is_iq2(type)) { // a scale per 16
            const mm_iq2 *b = (const mm_iq2 *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = iq2_scale(b, sb, r), m[sb] = 0;
            }
            d = dmin = ggml_fp16_to_fp32(b->d[r]) * IQ2_DMUL;
        } else if (type == GGML_TYPE_Q3_K) {
            const mm_q3k *b = (const mm_q3k *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = b->sc[sb][r], m[sb] = 4 * b->sc[sb][r];
            }
            d = dmin = ggml_fp16_to_fp32(b->d[r]);
        } else if (type == GGML_TYPE_Q6_K) {
            const mm_q6k *b = (const mm_q6k *)p;
            for (int sb = 0; sb < 16; sb++) {
                sc[sb] = b->sc[sb][r], m[sb] = 32 * b->sc[sb][r];
            }
            d = dmin = ggml_fp16_to_fp32(b->d[r]);
        } else {
            const mm_q4k *b = (const mm_q4k *)p; // Q5_K's starts with Q4_K's
            for (int sb = 0; sb < 8; sb++) {
                sc[sb] = b->sc[sb][r], m[sb] = b->m[sb][r];
            }
            d = ggml_fp16_to_fp32(b->d[r]);
            dmin = ggml_fp16_to_fp32(b->dmin[r]);
        }
        for (int t = 0; t < n; t++) {
            float fs = 0, fm = 0;
            for (int sb = 0; sb < nsub; sb++) {
                int s = 0;
                for (int k = 0; k < len; k++) {
                    s += packed_weight(type, p, r, len * sb + k) * a[t]->qs[len * sb + k];
                }
                fs += (float)s * (float)sc[sb];
                fm += (float)m[sb] * (six ? a[t]->bs16[sb] : a[t]->bs32[sb]);
            }
            y[t][2 * r] += d * a[t]->d * fs - dmin * a[t]->d * fm;
        }
    }
}

// ---- the vector paths --------------------------------------------------------------------------
//
// A `vg` is 64 bytes: 8 bytes of each of the 8 rows, or 16 int32 lanes (row r in lanes 2r and
// 2r+1); a `vgf` 16 float lanes the same way. One AVX-512 register, two AVX2 ones or four
// NEON ones; the kernels below are written once over these operations.

#if defined(MM_X86) && defined(__AVX512F__) && defined(__AVX512BW__)
typedef __m512i vg;
typedef __m512 vgf;
static inline vg vg_zero(void) { return _mm512_setzero_si512(); }
static inline vg vg_splat32(int32_t x) { return _mm512_set1_epi32(x); }
static inline vg vg_load(const void *p) { return _mm512_loadu_si512(p); }
static inline void vg_store(void *p, vg v) { _mm512_storeu_si512(p, v); }
static inline vg vg_and(vg v, uint8_t m) { return _mm512_and_si512(v, _mm512_set1_epi8((char)m)); }
static inline vg vg_xor(vg v, uint8_t m) { return _mm512_xor_si512(v, _mm512_set1_epi8((char)m)); }
// Bytes of a 16-entry table at each index (0..15) of idx; the table offset by Q8_BIAS.
static inline vg vg_lookup16(const int8_t *t, vg idx) {
    const __m128i v = _mm_xor_si128(_mm_loadu_si128((const __m128i *)t), _mm_set1_epi8((char)Q8_BIAS));
    return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(v), idx);
}
static inline vg vg_shr_and(vg v, int s, uint8_t m) {
    return _mm512_and_si512(_mm512_srli_epi16(v, (unsigned)s), _mm512_set1_epi8((char)m));
}
static inline vg vg_shl(vg v, int s) { return _mm512_slli_epi16(v, (unsigned)s); }
static inline vg vg_or(vg a, vg b) { return _mm512_or_si512(a, b); }
static inline vg vg_add(vg a, vg b) { return _mm512_add_epi32(a, b); }
// acc += per lane: 4 unsigned bytes of w × 4 signed bytes (p[0..4] in even lanes, p[4..8] in odd).
static inline vg vg_dot8(vg acc, vg w, const void *p) {
    int64_t x;
    memcpy(&x, p, 8);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi64(x));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, _mm512_set1_epi64(x)),
                                                   _mm512_set1_epi16(1)));
#endif
}
static inline vg vg_bcast8(const void *p) {
    int64_t x;
    memcpy(&x, p, 8);
    return _mm512_set1_epi64(x);
}
// vg_dot8 of signed weights: their signs moved onto the tokens (|w| × ±x).
static inline vg vg_dot8_ss(vg acc, vg w, const void *p) {
    const vg x = vg_bcast8(p);
    const vg sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(_mm512_abs_epi8(w), sx),
                                                   _mm512_set1_epi16(1)));
}
// Grid magnitudes g of 8 rows negated where the sign bits say (bit i of sg[r]: byte 8r + i),
// offset by Q8_BIAS.
static inline vg vg_signed(__m512i g, const uint8_t *sg) {
    uint64_t signs;
    memcpy(&signs, sg, 8);
    const __m512i v = _mm512_mask_sub_epi8(g, (__mmask64)signs, _mm512_setzero_si512(), g);
    return _mm512_xor_si512(v, _mm512_set1_epi8((char)Q8_BIAS));
}
// An IQ3 octet: 16 grid entries gathered by their indices (lo, and 256 where hi's bit is set),
// negated where the sign bit says, offset by Q8_BIAS.
static inline vg vg_grid(const uint32_t *grid, const uint8_t *lo, uint16_t hi, const uint8_t *sg) {
    // Loaded one by one (faster than a gather on Zen 4): the 9-bit indices made in a vector.
    uint16_t ix[16];
    __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)lo));
    idx = _mm512_mask_add_epi32(idx, (__mmask16)hi, idx, _mm512_set1_epi32(256));
    _mm256_storeu_si256((__m256i *)ix, _mm512_cvtepi32_epi16(idx));
#define G_(i) (int)grid[hi ? ix[i] : lo[i]]
    const __m512i g = _mm512_set_epi32(G_(15), G_(14), G_(13), G_(12), G_(11), G_(10), G_(9), G_(8), G_(7),
                                       G_(6), G_(5), G_(4), G_(3), G_(2), G_(1), G_(0));
#undef G_
    return vg_signed(g, sg);
}
// An IQ2 octet: 8 grid entries of 8 magnitudes, one per row (index lo, plus 256 × the two bits
// 2r, 2r + 1 of hi), signed and offset as IQ3's.
static inline vg vg_grid8(const uint64_t *grid, const uint8_t *lo, unsigned hi, const uint8_t *sg) {
#define G_(r) (long long)grid[lo[r] | ((hi >> (2 * (r))) & 3) << 8]
    const __m512i g = _mm512_set_epi64(G_(7), G_(6), G_(5), G_(4), G_(3), G_(2), G_(1), G_(0));
#undef G_
    return vg_signed(g, sg);
}
static inline vgf vgf_zero(void) { return _mm512_setzero_ps(); }
static inline vgf vgf_cvt(vg v) { return _mm512_cvtepi32_ps(v); }
static inline vgf vgf_fma(vgf a, vgf b, vgf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vgf vgf_fnma(vgf a, vgf b, vgf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vgf vgf_mul(vgf a, vgf b) { return _mm512_mul_ps(a, b); }
static inline vgf vgf_add(vgf a, vgf b) { return _mm512_add_ps(a, b); }
static inline vgf vgf_splat(float x) { return _mm512_set1_ps(x); }
static inline vgf vgf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vgf_store(float *p, vgf v) { _mm512_storeu_ps(p, v); }
// 8 per-row values → 16 lanes, each row's in its two.
static inline vgf vgf_u8(const uint8_t *p) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)));
}
static inline vgf vgf_i8(const int8_t *p) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(b, b)));
}
static inline vgf vgf_h8(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm512_cvtph_ps(_mm256_set_m128i(_mm_unpackhi_epi16(h, h), _mm_unpacklo_epi16(h, h)));
}
#define MM_VECTOR 1
#elif defined(MM_X86)
typedef struct { __m256i a, b; } vg;
typedef struct { __m256 a, b; } vgf;
#define VG2(expr_a, expr_b) { vg r_ = {expr_a, expr_b}; return r_; }
#define VGF2(expr_a, expr_b) { vgf r_ = {expr_a, expr_b}; return r_; }
static inline vg vg_zero(void) VG2(_mm256_setzero_si256(), _mm256_setzero_si256())
static inline vg vg_splat32(int32_t x) VG2(_mm256_set1_epi32(x), _mm256_set1_epi32(x))
static inline vg vg_load(const void *p) VG2(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1))
static inline void vg_store(void *p, vg v) {
    _mm256_storeu_si256((__m256i *)p, v.a);
    _mm256_storeu_si256((__m256i *)p + 1, v.b);
}
static inline vg vg_and(vg v, uint8_t m) VG2(_mm256_and_si256(v.a, _mm256_set1_epi8((char)m)), _mm256_and_si256(v.b, _mm256_set1_epi8((char)m)))
static inline vg vg_xor(vg v, uint8_t m) VG2(_mm256_xor_si256(v.a, _mm256_set1_epi8((char)m)), _mm256_xor_si256(v.b, _mm256_set1_epi8((char)m)))
static inline vg vg_lookup16(const int8_t *t, vg idx) {
    const __m256i v = _mm256_broadcastsi128_si256(
        _mm_xor_si128(_mm_loadu_si128((const __m128i *)t), _mm_set1_epi8((char)Q8_BIAS)));
    VG2(_mm256_shuffle_epi8(v, idx.a), _mm256_shuffle_epi8(v, idx.b))
}
static inline vg vg_shr_and(vg v, int s, uint8_t m)
    VG2(_mm256_and_si256(_mm256_srli_epi16(v.a, s), _mm256_set1_epi8((char)m)),
        _mm256_and_si256(_mm256_srli_epi16(v.b, s), _mm256_set1_epi8((char)m)))
static inline vg vg_shl(vg v, int s) VG2(_mm256_slli_epi16(v.a, s), _mm256_slli_epi16(v.b, s))
static inline vg vg_or(vg x, vg y) VG2(_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b))
static inline vg vg_add(vg x, vg y) VG2(_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b))
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, w, x) _mm256_dpbusd_epi32((acc), (w), (x))
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, w, x) _mm256_dpbusd_avx_epi32((acc), (w), (x))
#else
#define DPBUSD(acc, w, x) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((w), (x)), _mm256_set1_epi16(1)))
#endif
static inline vg vg_dot8(vg acc, vg w, const void *p) {
    int64_t x;
    memcpy(&x, p, 8);
    const __m256i v = _mm256_set1_epi64x(x);
    VG2(DPBUSD(acc.a, w.a, v), DPBUSD(acc.b, w.b, v))
}
static inline vg vg_bcast8(const void *p) {
    int64_t x;
    memcpy(&x, p, 8);
    const __m256i v = _mm256_set1_epi64x(x);
    VG2(v, v)
}
static inline __m256i dot8_ss(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)),
                                                   _mm256_set1_epi16(1)));
}
// vg_dot8 of signed weights: their signs moved onto the tokens (|w| × ±x).
static inline vg vg_dot8_ss(vg acc, vg w, const void *p) {
    const vg x = vg_bcast8(p);
    VG2(dot8_ss(acc.a, w.a, x.a), dot8_ss(acc.b, w.b, x.b))
}
// Grid magnitudes g of 4 rows negated where the sign bits say (bit i of sg[r]: byte 8r + i),
// offset by Q8_BIAS.
static inline __m256i signed_rows4(__m256i g, const uint8_t *sg) {
    int32_t signs;
    memcpy(&signs, sg, 4);
    // byte i of the vector: sign bit i % 8 of byte i / 8, as 0 or -1
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(signs),
                                              _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                 0x0303030303030303LL));
    const __m256i mbit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i neg = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, mbit), mbit);
    const __m256i v = _mm256_sub_epi8(_mm256_xor_si256(g, neg), neg);
    return _mm256_xor_si256(v, _mm256_set1_epi8((char)Q8_BIAS));
}
// Four rows of an IQ3 octet: 8 grid entries gathered, negated where the sign bit says, offset by
// Q8_BIAS.
static inline __m256i grid_rows4(const uint32_t *grid, const uint8_t *lo, unsigned hi, const uint8_t *sg) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i ninth = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)hi), bit), bit);
    const __m256i idx = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)lo)),
                                        _mm256_and_si256(ninth, _mm256_set1_epi32(256)));
    return signed_rows4(_mm256_i32gather_epi32((const int *)grid, idx, 4), sg);
}
static inline vg vg_grid(const uint32_t *grid, const uint8_t *lo, uint16_t hi, const uint8_t *sg)
    VG2(grid_rows4(grid, lo, hi & 0xFF, sg), grid_rows4(grid, lo + 8, hi >> 8, sg + 4))
// Four rows of an IQ2 octet: one grid entry of 8 magnitudes each.
static inline __m256i grid8_rows4(const uint64_t *grid, const uint8_t *lo, unsigned hi, const uint8_t *sg) {
#define G_(r) (long long)grid[lo[r] | ((hi >> (2 * (r))) & 3) << 8]
    return signed_rows4(_mm256_set_epi64x(G_(3), G_(2), G_(1), G_(0)), sg);
#undef G_
}
static inline vg vg_grid8(const uint64_t *grid, const uint8_t *lo, unsigned hi, const uint8_t *sg)
    VG2(grid8_rows4(grid, lo, hi & 0xFF, sg), grid8_rows4(grid, lo + 4, hi >> 8, sg + 4))
static inline vgf vgf_zero(void) VGF2(_mm256_setzero_ps(), _mm256_setzero_ps())
static inline vgf vgf_cvt(vg v) VGF2(_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b))
static inline vgf vgf_fma(vgf x, vgf y, vgf z) VGF2(_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b))
static inline vgf vgf_fnma(vgf x, vgf y, vgf z) VGF2(_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b))
static inline vgf vgf_mul(vgf x, vgf y) VGF2(_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b))
static inline vgf vgf_add(vgf x, vgf y) VGF2(_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b))
static inline vgf vgf_splat(float x) VGF2(_mm256_set1_ps(x), _mm256_set1_ps(x))
static inline vgf vgf_load(const float *p) VGF2(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8))
static inline void vgf_store(float *p, vgf v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
static inline vgf vgf_u8(const uint8_t *p) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), d = _mm_unpacklo_epi8(b, b);
    VGF2(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(d)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(d, 8))))
}
static inline vgf vgf_i8(const int8_t *p) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)p), d = _mm_unpacklo_epi8(b, b);
    VGF2(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(d)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(d, 8))))
}
static inline vgf vgf_h8(const uint16_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    VGF2(_mm256_cvtph_ps(_mm_unpacklo_epi16(h, h)), _mm256_cvtph_ps(_mm_unpackhi_epi16(h, h)))
}
#define MM_VECTOR 1
#elif defined(MM_NEON)
typedef struct { int32x4_t v[4]; } vg;
typedef struct { float32x4_t v[4]; } vgf;
#define EACH(T, e) { T r_; for (int i = 0; i < 4; i++) { r_.v[i] = (e); } return r_; }
#define U8(x) vreinterpretq_u8_s32(x)
#define S32(x) vreinterpretq_s32_u8(x)
static inline vg vg_zero(void) EACH(vg, vdupq_n_s32(0))
static inline vg vg_splat32(int32_t x) EACH(vg, vdupq_n_s32(x))
static inline vg vg_load(const void *p) EACH(vg, S32(vld1q_u8((const uint8_t *)p + 16 * i)))
static inline void vg_store(void *p, vg x) {
    for (int i = 0; i < 4; i++) {
        vst1q_u8((uint8_t *)p + 16 * i, U8(x.v[i]));
    }
}
static inline vg vg_and(vg x, uint8_t m) EACH(vg, S32(vandq_u8(U8(x.v[i]), vdupq_n_u8(m))))
static inline vg vg_xor(vg x, uint8_t m) EACH(vg, S32(veorq_u8(U8(x.v[i]), vdupq_n_u8(m))))
static inline vg vg_lookup16(const int8_t *t, vg idx) EACH(vg, S32(vqtbl1q_u8(vld1q_u8((const uint8_t *)t), U8(idx.v[i]))))
static inline vg vg_shr_and(vg x, int s, uint8_t m)
    EACH(vg, S32(vandq_u8(vshlq_u8(U8(x.v[i]), vdupq_n_s8((int8_t)-s)), vdupq_n_u8(m))))
static inline vg vg_shl(vg x, int s) EACH(vg, S32(vshlq_u8(U8(x.v[i]), vdupq_n_s8((int8_t)s))))
static inline vg vg_or(vg x, vg y) EACH(vg, vorrq_s32(x.v[i], y.v[i]))
static inline vg vg_add(vg x, vg y) EACH(vg, vaddq_s32(x.v[i], y.v[i]))
// The weights are below 64: as signed bytes they are the same values (sdot).
static inline vg vg_dot8(vg acc, vg w, const void *p) {
    const int8x16_t x = vreinterpretq_s8_s64(vld1q_dup_s64((const int64_t *)p));
    EACH(vg, vdotq_s32(acc.v[i], vreinterpretq_s8_s32(w.v[i]), x))
}
static inline vg vg_bcast8(const void *p) EACH(vg, vreinterpretq_s32_s64(vld1q_dup_s64((const int64_t *)p)))
// sdot is signed × signed already.
static inline vg vg_dot8_ss(vg acc, vg w, const void *p) { return vg_dot8(acc, w, p); }
// Two rows of an IQ3 octet from their 4 grid entries, negated where the sign bit says (signed:
// sdot).
static inline int32x4_t grid_rows2(const void *g, const uint8_t *sg) {
    const uint8x16_t mbit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ULL));
    const uint8x16_t neg = vtstq_u8(vcombine_u8(vdup_n_u8(sg[0]), vdup_n_u8(sg[1])), mbit);
    return S32(vsubq_u8(veorq_u8(vld1q_u8((const uint8_t *)g), neg), neg));
}
// An IQ3 octet: its 16 grid entries looked up one by one.
static inline vg vg_grid(const uint32_t *grid, const uint8_t *lo, uint16_t hi, const uint8_t *sg) {
    uint32_t g[16];
    for (int i = 0; i < 16; i++) {
        g[i] = grid[lo[i] | ((hi >> i) & 1) << 8];
    }
    EACH(vg, grid_rows2(g + 4 * i, sg + 2 * i))
}
// An IQ2 octet: its 8 grid entries (one per row) looked up one by one.
static inline vg vg_grid8(const uint64_t *grid, const uint8_t *lo, unsigned hi, const uint8_t *sg) {
    uint64_t g[8];
    for (int r = 0; r < 8; r++) {
        g[r] = grid[lo[r] | ((hi >> (2 * r)) & 3) << 8];
    }
    EACH(vg, grid_rows2(g + 2 * i, sg + 2 * i))
}
static inline vgf vgf_zero(void) EACH(vgf, vdupq_n_f32(0))
static inline vgf vgf_cvt(vg x) EACH(vgf, vcvtq_f32_s32(x.v[i]))
static inline vgf vgf_fma(vgf x, vgf y, vgf z) EACH(vgf, vfmaq_f32(z.v[i], x.v[i], y.v[i]))
static inline vgf vgf_fnma(vgf x, vgf y, vgf z) EACH(vgf, vfmsq_f32(z.v[i], x.v[i], y.v[i]))
static inline vgf vgf_mul(vgf x, vgf y) EACH(vgf, vmulq_f32(x.v[i], y.v[i]))
static inline vgf vgf_add(vgf x, vgf y) EACH(vgf, vaddq_f32(x.v[i], y.v[i]))
static inline vgf vgf_splat(float x) EACH(vgf, vdupq_n_f32(x))
static inline vgf vgf_load(const float *p) EACH(vgf, vld1q_f32(p + 4 * i))
static inline void vgf_store(float *p, vgf x) {
    for (int i = 0; i < 4; i++) {
        vst1q_f32(p + 4 * i, x.v[i]);
    }
}
// Four floats of rows 2i, 2i, 2i+1, 2i+1 from 8 per-row floats.
static inline vgf vgf_dup(const float *f) EACH(vgf, vcombine_f32(vdup_n_f32(f[2 * i]), vdup_n_f32(f[2 * i + 1])))
// 8 per-row values → lanes 4i..4i+3 of rows 2i, 2i, 2i+1, 2i+1, widened in registers.
static inline vgf vgf_u8(const uint8_t *p) {
    const uint8x8_t b = vld1_u8(p);
    const uint16x8_t w[2] = {vmovl_u8(vzip1_u8(b, b)), vmovl_u8(vzip2_u8(b, b))};
    EACH(vgf, vcvtq_f32_u32(vmovl_u16(i % 2 ? vget_high_u16(w[i / 2]) : vget_low_u16(w[i / 2]))))
}
static inline vgf vgf_i8(const int8_t *p) {
    const int8x8_t b = vld1_s8(p);
    const int16x8_t w[2] = {vmovl_s8(vzip1_s8(b, b)), vmovl_s8(vzip2_s8(b, b))};
    EACH(vgf, vcvtq_f32_s32(vmovl_s16(i % 2 ? vget_high_s16(w[i / 2]) : vget_low_s16(w[i / 2]))))
}
static inline vgf vgf_h8(const uint16_t *p) {
    float f[8];
    vst1q_f32(f, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))));
    vst1q_f32(f + 4, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4))));
    return vgf_dup(f);
}
#define MM_VECTOR 1
#endif

#if defined(MM_VECTOR)

// One superblock of 8 rows × N tokens, added to y[t][0..16] (row r in lanes 2r, 2r+1).
// Sub-blocks go in pairs that share their bytes (`PAIR(p, k8, lo, hi)` makes both pairs'
// values once), each dotted with every token; with few tokens each token's sums are split over
// KS chains, so that enough dot products are in flight to hide their latency.
#define KS (N == 1 ? 2 : 1)
#define KQUANT_BLOCK(NAME, T, NPAIR, LEN, LO, HI, PAIR, SCALE, SHARED, DOT, OFF, MINS, MIN, D, DMIN, BS) \
    static inline void NAME(const void *pb, const mm_act *const *a, float (*y)[2 * ROWS]) {      \
        const T *b = (const T *)pb;                                                                \
        vgf fs[N], fs1[N]; /* the pairs' low and high sub-blocks: two chains */                   \
        for (int t = 0; t < N; t++) {                                                              \
            fs[t] = fs1[t] = vgf_zero();                                                           \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int p = 0; p < NPAIR; p++) {                                  \
            vg s0[N][KS], s1[N][KS];                                                               \
            for (int t = 0; t < N; t++) {                                                          \
                for (int c = 0; c < KS; c++) {                                                     \
                    s0[t][c] = OFF && c == 0 ? vg_splat32(a[t]->off16[LO(p)]) : vg_zero();         \
                    s1[t][c] = OFF && c == 0 ? vg_splat32(a[t]->off16[HI(p)]) : vg_zero();         \
                }                                                                                  \
            }                                                                                      \
            _Pragma("GCC unroll 4") for (int k8 = 0; k8 < LEN / 8; k8++) {                         \
                vg lo, hi;                                                                         \
                PAIR(p, k8, lo, hi);                                                               \
                for (int t = 0; t < N; t++) {                                                      \
                    s0[t][k8 % KS] = DOT(s0[t][k8 % KS], lo, a[t]->qs + LEN * LO(p) + 8 * k8);     \
                    s1[t][k8 % KS] = DOT(s1[t][k8 % KS], hi, a[t]->qs + LEN * HI(p) + 8 * k8);     \
                }                                                                                  \
            }                                                                                      \
            /* SHARED: both sub-blocks of a pair have one scale (IQ4_XS's 32 as two 16s). */      \
            const vgf sc0 = SCALE(LO(p)), sc1 = SHARED ? sc0 : SCALE(HI(p));                       \
            for (int t = 0; t < N; t++) {                                                          \
                for (int c = 1; c < KS; c++) {                                                     \
                    s0[t][0] = vg_add(s0[t][0], s0[t][c]);                                         \
                    s1[t][0] = vg_add(s1[t][0], s1[t][c]);                                         \
                }                                                                                  \
                if (SHARED) {                                                                      \
                    fs[t] = vgf_fma(vgf_cvt(vg_add(s0[t][0], s1[t][0])), sc0, fs[t]);              \
                } else {                                                                           \
                    fs[t] = vgf_fma(vgf_cvt(s0[t][0]), sc0, fs[t]);                                \
                    fs1[t] = vgf_fma(vgf_cvt(s1[t][0]), sc1, fs1[t]);                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        /* The mins (MINS): Σ over sub-blocks of min × the token's sum there (no weight        \
           values). An offset (OFF) was taken off in the integer sums already. */                 \
        vgf mn[2 * NPAIR];                                                                         \
        for (int sb = 0; sb < 2 * NPAIR && MINS; sb++) {                                           \
            mn[sb] = MIN(sb);                                                                      \
        }                                                                                          \
        const vgf d = D, dmin = DMIN;                                                              \
        for (int t = 0; t < N; t++) {                                                              \
            /* Two float chains whatever N: a token's sum never depends on the step's others. */ \
            vgf fm[2] = {vgf_zero(), vgf_zero()};                                                  \
            for (int sb = 0; sb < 2 * NPAIR && MINS; sb++) {                                      \
                fm[sb % 2] = vgf_fma(mn[sb], vgf_splat(a[t]->BS[sb]), fm[sb % 2]);                 \
            }                                                                                      \
            fm[0] = vgf_add(fm[0], fm[1]);                                                         \
            /* Both lanes of a row hold its whole min term: half in each (exact). */               \
            const vgf da = vgf_splat(a[t]->d), da_half = vgf_splat(0.5f * a[t]->d);                \
            vgf acc = vgf_load(y[t]);                                                              \
            acc = vgf_fma(vgf_add(fs[t], fs1[t]), vgf_mul(d, da), acc);                            \
            if (MINS) {                                                                            \
                acc = vgf_fnma(fm[0], vgf_mul(dmin, da_half), acc);                                \
            }                                                                                      \
            vgf_store(y[t], acc);                                                                  \
        }                                                                                          \
    }

#define Q4K_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->nib[p][k8]);                                                      \
        lo = vg_and(v_, 0x0F);                                                                     \
        hi = vg_shr_and(v_, 4, 0x0F);                                                              \
    } while (0)
#define Q5K_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->nib[p][k8]), h_ = vg_load(((const mm_q5k *)b)->hb[k8]);                             \
        lo = vg_or(vg_and(v_, 0x0F), vg_shl(vg_shr_and(h_, 2 * (p), 1), 4));                       \
        hi = vg_or(vg_shr_and(v_, 4, 0x0F), vg_shl(vg_shr_and(h_, 2 * (p) + 1, 1), 4));            \
    } while (0)
#define Q6K_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->nib[p][k8]), h_ = vg_load(b->h2[2 * ((p) / 4) + (p) % 2][k8]);    \
        lo = vg_or(vg_and(v_, 0x0F), vg_shl(vg_shr_and(h_, 2 * ((p) % 4 / 2), 3), 4));             \
        hi = vg_or(vg_shr_and(v_, 4, 0x0F), vg_shl(vg_shr_and(h_, 2 * ((p) % 4 / 2) + 4, 3), 4));  \
    } while (0)
#define KLO(p) (2 * (p))
#define KHI(p) (2 * (p) + 1)
#define Q6LO(p) (8 * ((p) / 4) + (p) % 4)
#define Q6HI(p) (8 * ((p) / 4) + (p) % 4 + 4)
#define KSC(sb) vgf_u8(b->sc[sb])
#define KMIN(sb) vgf_u8(b->m[sb])
#define Q6SC(sb) vgf_i8(b->sc[sb])
#define NO_MIN(sb) vgf_zero() // no mins (MINS = 0)

#define Q2LO(p) (8 * ((p) / 4) + 4 * ((p) / 2 % 2) + (p) % 2)
#define Q2HI(p) (Q2LO(p) + 2)
#define Q2K_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->q[(p) / 4][2 * ((p) % 2) + (k8)]);                                \
        lo = vg_shr_and(v_, 4 * ((p) / 2 % 2), 3);                                                 \
        hi = vg_shr_and(v_, 4 * ((p) / 2 % 2) + 2, 3);                                             \
    } while (0)
#define Q3K_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->q[(p) / 4][2 * ((p) % 2) + (k8)]), h_ = vg_load(b->h[2 * ((p) % 2) + (k8)]); \
        const int s_ = 4 * ((p) / 2 % 2), hb_ = 4 * ((p) / 4) + 2 * ((p) / 2 % 2);                 \
        lo = vg_or(vg_shr_and(v_, s_, 3), vg_shl(vg_shr_and(h_, hb_, 1), 2));                      \
        hi = vg_or(vg_shr_and(v_, s_ + 2, 3), vg_shl(vg_shr_and(h_, hb_ + 1, 1), 2));              \
    } while (0)
// Q2_K's scale (low nibble) or min (high) of 8 rows.
static inline vgf vgf_nib(const uint8_t *p, int hi) {
    uint64_t v;
    memcpy(&v, p, 8);
    v = (hi ? v >> 4 : v) & 0x0F0F0F0F0F0F0F0FULL;
    return vgf_u8((const uint8_t *)&v);
}
#define Q2SC(sb) vgf_nib(b->scm[sb], 0)
#define Q2MIN(sb) vgf_nib(b->scm[sb], 1)

// One superblock (eight blocks of 32) of Q4_0 or Q8_0, 8 rows × N tokens: each block's four
// vectors dotted with every token, starting from the token's share of the weights' offset,
// then scaled per row and token.
#define TYPE0_BLOCK(NAME, T, WEIGHTS, DOT)                                                         \
    static inline void NAME(const void *pb, const mm_act *const *a_, float (*y)[2 * ROWS]) {     \
        const T *b = (const T *)pb;                                                                \
        const mm_act0 *const *a = (const mm_act0 *const *)a_;                                      \
        vgf fs[N];                                                                                 \
        for (int t = 0; t < N; t++) {                                                              \
            fs[t] = vgf_load(y[t]);                                                                \
        }                                                                                          \
        _Pragma("GCC unroll 8") for (int blk = 0; blk < 8; blk++) {                                \
            vg w[4];                                                                               \
            WEIGHTS(blk, w);                                                                       \
            const vgf dw = vgf_h8(b->d[blk]);                                                      \
            for (int t = 0; t < N; t++) {                                                          \
                /* two chains of dot products (latency), joined */                                 \
                vg s = vg_bcast8(a[t]->corr[blk]), s2 = vg_zero();                                 \
                s = DOT(s, w[0], a[t]->qs + 32 * blk);                                             \
                s2 = DOT(s2, w[1], a[t]->qs + 32 * blk + 8);                                       \
                s = DOT(s, w[2], a[t]->qs + 32 * blk + 16);                                        \
                s2 = DOT(s2, w[3], a[t]->qs + 32 * blk + 24);                                      \
                fs[t] = vgf_fma(vgf_cvt(vg_add(s, s2)), vgf_mul(dw, vgf_splat(a[t]->d[blk])), fs[t]); \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < N; t++) {                                                              \
            vgf_store(y[t], fs[t]);                                                                \
        }                                                                                          \
    }
#define Q40_W(blk, w)                                                                              \
    do {                                                                                           \
        const vg v0_ = vg_load(b->q[blk][0]), v1_ = vg_load(b->q[blk][1]);                         \
        w[0] = vg_and(v0_, 0x0F);                                                                  \
        w[1] = vg_and(v1_, 0x0F);                                                                  \
        w[2] = vg_shr_and(v0_, 4, 0x0F);                                                           \
        w[3] = vg_shr_and(v1_, 4, 0x0F);                                                           \
    } while (0)
#if Q8_BIAS
#define Q8_DOT vg_dot8
#define Q8_SIGNED(v) (v)
#else
#define Q8_DOT vg_dot8_ss
#define Q8_SIGNED(v) vg_xor(v, 0x80)
#endif
// IQ4_XS: each sub-block of 32 as a pair of 16 (its scale twice), the indices looked up.
#define IQ4_PAIR(p, k8, lo, hi)                                                                    \
    do {                                                                                           \
        const vg v_ = vg_load(b->nib[p][k8]);                                                      \
        lo = vg_lookup16(IQ4NL, vg_and(v_, 0x0F));                                                 \
        hi = vg_lookup16(IQ4NL, vg_shr_and(v_, 4, 0x0F));                                          \
    } while (0)
#define IQ4SC(sb) vgf_i8(b->sc[(sb) / 2])
// IQ3_S and IQ3_XXS: as IQ4_XS, the octets' grid entries gathered.
#define IQ3S_PAIR(p, k8, lo, hi)                                                                   \
    do {                                                                                           \
        lo = vg_grid(iq3s_grid, b->lo[4 * (p) + (k8)], b->hi[4 * (p) + (k8)], b->sg[4 * (p) + (k8)]); \
        hi = vg_grid(iq3s_grid, b->lo[4 * (p) + 2 + (k8)], b->hi[4 * (p) + 2 + (k8)], b->sg[4 * (p) + 2 + (k8)]); \
    } while (0)
#define UNPACKED_PAIR(p, k8, lo, hi)                                                               \
    do {                                                                                           \
        lo = vg_load(b->v[4 * (p) + (k8)]);                                                        \
        hi = vg_load(b->v[4 * (p) + 2 + (k8)]);                                                    \
    } while (0)
#define IQ3XXS_PAIR(p, k8, lo, hi)                                                                 \
    do {                                                                                           \
        lo = vg_grid(iq3xxs_grid, b->lo[4 * (p) + (k8)], 0, b->sg[4 * (p) + (k8)]);                \
        hi = vg_grid(iq3xxs_grid, b->lo[4 * (p) + 2 + (k8)], 0, b->sg[4 * (p) + 2 + (k8)]);        \
    } while (0)
// The IQ2 types: as IQ3's, one grid entry per row of an octet.
#define IQ2_PAIR(p, k8, lo, hi, grid, HI)                                                          \
    do {                                                                                           \
        lo = vg_grid8(grid, b->lo[4 * (p) + (k8)], HI(4 * (p) + (k8)), b->sg[4 * (p) + (k8)]);     \
        hi = vg_grid8(grid, b->lo[4 * (p) + 2 + (k8)], HI(4 * (p) + 2 + (k8)), b->sg[4 * (p) + 2 + (k8)]); \
    } while (0)
#define IQ2_HI(o) b->hi[o]
#define IQ2_NO_HI(o) 0
#define IQ2XXS_PAIR(p, k8, lo, hi) IQ2_PAIR(p, k8, lo, hi, iq2xxs_grid, IQ2_NO_HI)
#define IQ2XS_PAIR(p, k8, lo, hi) IQ2_PAIR(p, k8, lo, hi, iq2xs_grid, IQ2_HI)
#define IQ2S_PAIR(p, k8, lo, hi) IQ2_PAIR(p, k8, lo, hi, iq2s_grid, IQ2_HI)
// IQ2_XS's and IQ2_S's scale of sub-block sb (of 16) for 8 rows (iq2_scale's, in float).
#define IQ2SC(sb) vgf_fma(vgf_nib(b->sc[(sb) / 2], (sb) % 2), vgf_splat(2.0f), vgf_splat(1.0f))
#define IQ2_D vgf_mul(vgf_h8(b->d), vgf_splat(IQ2_DMUL))
#define Q80_W(blk, w)                                                                              \
    do {                                                                                           \
        for (int c_ = 0; c_ < 4; c_++) {                                                           \
            w[c_] = Q8_SIGNED(vg_load(b->q[blk][c_]));                                             \
        }                                                                                          \
    } while (0)

#define KQUANT_BLOCKS(N)                                                                           \
    KQUANT_BLOCK(q2k_##N, mm_q2k, 8, 16, Q2LO, Q2HI, Q2K_PAIR, Q2SC, 0, vg_dot8, 0, 1, Q2MIN, vgf_h8(b->d), vgf_h8(b->dmin), bs16) \
    KQUANT_BLOCK(q3k_##N, mm_q3k, 8, 16, Q2LO, Q2HI, Q3K_PAIR, Q6SC, 0, vg_dot8, 1, 0, NO_MIN, vgf_h8(b->d), vgf_h8(b->d), bs16) \
    TYPE0_BLOCK(q40_##N, mm_q40, Q40_W, vg_dot8)                                                   \
    KQUANT_BLOCK(iq4_##N, mm_iq4xs, 8, 16, KLO, KHI, IQ4_PAIR, IQ4SC, 1, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, vgf_h8(b->d), vgf_h8(b->d), bs16) \
    KQUANT_BLOCK(iq3s_##N, mm_iq3s, 8, 16, KLO, KHI, IQ3S_PAIR, IQ4SC, 1, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, vgf_h8(b->d), vgf_h8(b->d), bs16) \
    KQUANT_BLOCK(iq3xxs_##N, mm_iq3xxs, 8, 16, KLO, KHI, IQ3XXS_PAIR, IQ4SC, 1, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, vgf_mul(vgf_h8(b->d), vgf_splat(IQ3XXS_DMUL)), vgf_h8(b->d), bs16) \
    KQUANT_BLOCK(iq2xxs_##N, mm_iq2xxs, 8, 16, KLO, KHI, IQ2XXS_PAIR, IQ4SC, 1, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, IQ2_D, IQ2_D, bs16) \
    KQUANT_BLOCK(iq2xs_##N, mm_iq2, 8, 16, KLO, KHI, IQ2XS_PAIR, IQ2SC, 0, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, IQ2_D, IQ2_D, bs16) \
    KQUANT_BLOCK(iq2s_##N, mm_iq2, 8, 16, KLO, KHI, IQ2S_PAIR, IQ2SC, 0, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, IQ2_D, IQ2_D, bs16) \
    KQUANT_BLOCK(unpacked_##N, mm_grid_unpacked, 8, 16, KLO, KHI, UNPACKED_PAIR, IQ4SC, 1, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, vgf_mul(vgf_h8(b->d), vgf_splat(b->dmul)), vgf_h8(b->d), bs16) \
    KQUANT_BLOCK(unpacked16_##N, mm_grid_unpacked, 8, 16, KLO, KHI, UNPACKED_PAIR, Q6SC, 0, Q8_DOT, Q8_BIAS != 0, 0, NO_MIN, vgf_mul(vgf_h8(b->d), vgf_splat(b->dmul)), vgf_h8(b->d), bs16) \
    TYPE0_BLOCK(q80_##N, mm_q80, Q80_W, Q8_DOT)                                                    \
    KQUANT_BLOCK(q4k_##N, mm_q4k, 4, 32, KLO, KHI, Q4K_PAIR, KSC, 0, vg_dot8, 0, 1, KMIN, vgf_h8(b->d), vgf_h8(b->dmin), bs32)  \
    KQUANT_BLOCK(q5k_##N, mm_q4k, 4, 32, KLO, KHI, Q5K_PAIR, KSC, 0, vg_dot8, 0, 1, KMIN, vgf_h8(b->d), vgf_h8(b->dmin), bs32)  \
    KQUANT_BLOCK(q6k_##N, mm_q6k, 8, 16, Q6LO, Q6HI, Q6K_PAIR, Q6SC, 0, vg_dot8, 1, 0, NO_MIN, vgf_h8(b->d), vgf_h8(b->d), bs16)

// Each token count its own functions, so that the compiler keeps the tokens' sums in registers:
// 1, 2, 3, 4 and 8 (5 to 7 tokens go as 4 and the rest: a smaller library).
#define N 1
KQUANT_BLOCKS(1)
#undef N
#define N 2
KQUANT_BLOCKS(2)
#undef N
#define N 3
KQUANT_BLOCKS(3)
#undef N
#define N 4
KQUANT_BLOCKS(4)
#undef N
#define N 8
KQUANT_BLOCKS(8)
#undef N

typedef void (*block_fn)(const void *, const mm_act *const *, float (*)[2 * ROWS]);

#define FNS(name) {name##_1, name##_2, name##_3, name##_4, NULL, NULL, NULL, name##_8}
static const block_fn IQ4_FNS[TOKENS] = FNS(iq4);
static const block_fn IQ3S_FNS[TOKENS] = FNS(iq3s);
static const block_fn IQ3XXS_FNS[TOKENS] = FNS(iq3xxs);
static const block_fn IQ2XXS_FNS[TOKENS] = FNS(iq2xxs);
static const block_fn IQ2XS_FNS[TOKENS] = FNS(iq2xs);
static const block_fn IQ2S_FNS[TOKENS] = FNS(iq2s);
static const block_fn UNPACKED_FNS[TOKENS] = FNS(unpacked);
static const block_fn UNPACKED16_FNS[TOKENS] = FNS(unpacked16);

// A grid-coded superblock unpacked as its kernels unpack it; the kernels that read it
// (UNPACKED16_FNS for a scale per 16, else UNPACKED_FNS).
static void unpack_grid(int type, const void *pb, mm_grid_unpacked *u) {
    const uint16_t *d;
    const int8_t(*sc)[8] = NULL; // a scale per 32 as 1 + 2s (else one per 16, set below)
    switch (type) {
    case GGML_TYPE_IQ3_S: {
        const mm_iq3s *b = (const mm_iq3s *)pb;
        for (int o = 0; o < 32; o++) vg_store(u->v[o], vg_grid(iq3s_grid, b->lo[o], b->hi[o], b->sg[o]));
        d = b->d, sc = b->sc, u->dmul = 1.0f;
        break;
    }
    case GGML_TYPE_IQ3_XXS: {
        const mm_iq3xxs *b = (const mm_iq3xxs *)pb;
        for (int o = 0; o < 32; o++) vg_store(u->v[o], vg_grid(iq3xxs_grid, b->lo[o], 0, b->sg[o]));
        d = b->d, sc = b->sc, u->dmul = IQ3XXS_DMUL;
        break;
    }
    case GGML_TYPE_IQ2_XXS: {
        const mm_iq2xxs *b = (const mm_iq2xxs *)pb;
        for (int o = 0; o < 32; o++) vg_store(u->v[o], vg_grid8(iq2xxs_grid, b->lo[o], 0, b->sg[o]));
        d = b->d, sc = b->sc, u->dmul = IQ2_DMUL;
        break;
    }
    default: { // IQ2_S, IQ2_XS
        const mm_iq2 *b = (const mm_iq2 *)pb;
        const uint64_t *grid = type == GGML_TYPE_IQ2_S ? iq2s_grid : iq2xs_grid;
        for (int o = 0; o < 32; o++) vg_store(u->v[o], vg_grid8(grid, b->lo[o], b->hi[o], b->sg[o]));
        for (int sb = 0; sb < 16; sb++) {
            for (int r = 0; r < ROWS; r++) u->sc[sb][r] = (int8_t)iq2_scale(b, sb, r);
        }
        d = b->d, u->dmul = IQ2_DMUL;
    }
    }
    memcpy(u->d, d, sizeof u->d);
    if (sc) memcpy(u->sc, sc, 8 * sizeof *sc);
}
static const block_fn Q2K_FNS[TOKENS] = FNS(q2k);
static const block_fn Q3K_FNS[TOKENS] = FNS(q3k);
static const block_fn Q40_FNS[TOKENS] = FNS(q40);
static const block_fn Q80_FNS[TOKENS] = FNS(q80);
static const block_fn Q4K_FNS[TOKENS] = FNS(q4k);
static const block_fn Q5K_FNS[TOKENS] = FNS(q5k);
static const block_fn Q6K_FNS[TOKENS] = FNS(q6k);

static const block_fn *block_fns(int type) {
    switch (type) {
    case GGML_TYPE_IQ4_XS: return IQ4_FNS;
    case GGML_TYPE_IQ3_S: return IQ3S_FNS;
    case GGML_TYPE_IQ3_XXS: return IQ3XXS_FNS;
    case GGML_TYPE_IQ2_XXS: return IQ2XXS_FNS;
    case GGML_TYPE_IQ2_XS: return IQ2XS_FNS;
    case GGML_TYPE_IQ2_S: return IQ2S_FNS;
    case GGML_TYPE_Q2_K: return Q2K_FNS;
    case GGML_TYPE_Q3_K: return Q3K_FNS;
    case GGML_TYPE_Q4_0: return Q40_FNS;
    case GGML_TYPE_Q8_0: return Q80_FNS;
    case GGML_TYPE_Q4_K: return Q4K_FNS;
    case GGML_TYPE_Q5_K: return Q5K_FNS;
    default: return Q6K_FNS;
    }
}
#endif

// Whether this build has a vector path (else the scalar one runs: correct, but slower than
// ggml's; the caller keeps ggml's kernels then).
int phi4_mm_vector(void) {
#if defined(MM_VECTOR)
    return 1;
#else
    return 0;
#endif
}

// y[t][row] for the rows of groups [g0, g1) and tokens [0, m): y's rows (tokens) `y_stride`
// bytes apart, `nrows` rows in all (a last group's padding rows are not written).
// `scalar` asks for the scalar path.
void phi4_mm_run(int type, const void *w, const void *q, int64_t k, int64_t m, int64_t nrows,
                 float *y, size_t y_stride, int64_t g0, int64_t g1, int scalar) {
    const int64_t nb = k / QK;
    const size_t pbs = packed_block_size(type);
#if defined(MM_VECTOR)
    const block_fn *fns = block_fns(type);
    // The grid-coded types' look-ups cost more than their dot products: for a step of more
    // tokens than one register block, each group's superblocks are unpacked once, and every
    // block of tokens reads them unpacked (the same vectors and scales, so the same sums).
    mm_grid_unpacked *unpacked = NULL;
    const block_fn *unpacked_fns = type == GGML_TYPE_IQ2_S || type == GGML_TYPE_IQ2_XS ? UNPACKED16_FNS : UNPACKED_FNS;
    if (!scalar && m > TOKENS && is_grid(type)) {
        unpacked = malloc(sizeof(mm_grid_unpacked) * (size_t)nb); // NULL: unpacked per block
    }
#else
    scalar = 1;
#endif
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *wg = (const uint8_t *)w + (size_t)g * pbs * (size_t)nb;
#if defined(MM_VECTOR)
        for (int64_t b = 0; unpacked && b < nb; b++) {
            unpack_grid(type, wg + (size_t)b * pbs, &unpacked[b]);
        }
#endif
        for (int64_t t0 = 0, n; t0 < m; t0 += n) {
            n = m - t0 < TOKENS ? m - t0 : TOKENS;
            n = n > 4 && n < TOKENS ? 4 : n;
            float acc[TOKENS][2 * ROWS]; // row r: the sum of lanes 2r and 2r + 1
            memset(acc, 0, sizeof acc);
            const mm_act *a[TOKENS];
            for (int64_t b = 0; b < nb; b++) {
                for (int t = 0; t < n; t++) {
                    a[t] = (const mm_act *)q + (size_t)(t0 + t) * (size_t)nb + b;
                }
                const uint8_t *wb = wg + (size_t)b * pbs;
                // The weights stream from memory once per step: ask for them ahead of use (the
                // next group's follow this one's), a whole superblock's lines at a time.
                // Prefetching past the matrix's end is harmless (never faults).
                for (size_t o = 0; o < pbs; o += 64) {
                    __builtin_prefetch(wb + PREFETCH + o, 0, 2);
                }
                if (scalar) {
                    block_scalar(type, wb, a, (int)n, acc);
                }
#if defined(MM_VECTOR)
                else if (unpacked) {
                    unpacked_fns[n - 1](&unpacked[b], a, acc);
                } else {
                    fns[n - 1](wb, a, acc);
                }
#endif
            }
            for (int t = 0; t < n; t++) {
                float *yr = (float *)((char *)y + (size_t)(t0 + t) * y_stride);
                for (int r = 0; r < ROWS && g * ROWS + r < nrows; r++) {
                    yr[g * ROWS + r] = acc[t][2 * r] + acc[t][2 * r + 1];
                }
            }
        }
    }
#if defined(MM_VECTOR)
    free(unpacked);
#endif
}

// ---- inside ggml's graph -----------------------------------------------------------------------

// Custom op: dst (I8, [act bytes, m]) = src[0] (F32, [k, m]) quantized for the weight type in
// userdata; tokens split by thread.
void phi4_mm_op_quantize(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const int type = (int)(intptr_t)userdata;
    const struct ggml_tensor *x = dst->src[0];
    const int64_t k = x->ne[0], m = x->ne[1];
    const int64_t t0 = m * ith / nth, t1 = m * (ith + 1) / nth;
    phi4_mm_quantize(type, (const float *)x->data, x->nb[1], k, dst->data, t0, t1);
}

// Custom op: dst (F32, [n, m]) = src[0] (I8: the packed weights, [group bytes, groups]) ·
// src[1] (the quantized activations); the weight type in userdata; groups split by thread.
void phi4_mm_op_matmul(struct ggml_tensor *dst, int ith, int nth, void *userdata) {
    const int type = (int)(intptr_t)userdata;
    const struct ggml_tensor *w = dst->src[0], *q = dst->src[1];
    const int64_t groups = w->ne[1];
    const int64_t k = (int64_t)(q->ne[0] / sizeof(mm_act)) * QK;
    const int64_t g0 = groups * ith / nth, g1 = groups * (ith + 1) / nth;
    phi4_mm_run(type, w->data, q->data, k, dst->ne[1], dst->ne[0], (float *)dst->data, dst->nb[1], g0,
                g1, 0);
}
