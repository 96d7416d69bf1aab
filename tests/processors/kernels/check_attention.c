/* Runs the attention kernel over many shapes with exact-size buffers: built with
 * -fsanitize=address,undefined by tests/processors/test_attention.py, any read or write past a
 * buffer or undefined arithmetic aborts it. Each output must be a weighted mean of the values
 * (all in [-0.5, 0.5]): finite and within that range. Prints "<n> shapes clean". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cw_attention(const void *q, const void *k, const void *v, void *out, const int32_t *lengths,
                 const int64_t *qs, const int64_t *ks, const int64_t *vs, int batch, int seq,
                 int heads, int dim, int bf16, float scale, int threads);

static float value_at(const void *base, int bf16, size_t i) {
    if (!bf16) return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

int main(void) {
    const int seqs[] = {1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 290, 511, 512};
    const int dims[] = {16, 32, 48, 64, 128};
    const int heads = 3, batch = 3;
    int shapes = 0;
    srand(7);
    for (int bf16 = 0; bf16 < 2; bf16++) {
        for (size_t si = 0; si < sizeof seqs / sizeof *seqs; si++) {
            for (size_t di = 0; di < sizeof dims / sizeof *dims; di++) {
                const int seq = seqs[si], dim = dims[di];
                const size_t es = bf16 ? 2 : 4, n = (size_t)batch * seq * 3 * heads * dim;
                char *qkv = malloc(n * es), *out = malloc((size_t)batch * seq * heads * dim * es);
                if (!qkv || !out) return 2;
                for (size_t i = 0; i < n; i++) {
                    float f = (float)rand() / (float)RAND_MAX - 0.5f;
                    if (bf16) {
                        uint32_t u;
                        memcpy(&u, &f, sizeof u);
                        ((uint16_t *)qkv)[i] = (uint16_t)(u >> 16);
                    } else {
                        ((float *)qkv)[i] = f;
                    }
                }
                const int32_t lengths[3] = {seq, seq > 1 ? seq - 1 : 1, 1};
                const int64_t strides[3] = {(int64_t)seq * 3 * heads * dim, 3 * heads * dim, dim};
                const size_t part = (size_t)heads * dim * es;
                int rc = cw_attention(qkv, qkv + part, qkv + 2 * part, out, lengths, strides,
                                      strides, strides, batch, seq, heads, dim, bf16, 0.125f, 2);
                if (rc != 0) {
                    printf("code %d for seq %d dim %d bf16 %d\n", rc, seq, dim, bf16);
                    return 1;
                }
                for (size_t i = 0; i < (size_t)batch * seq * heads * dim; i++) {
                    float f = value_at(out, bf16, i);
                    if (!(f >= -0.5f && f <= 0.5f)) {
                        printf("value %g at %zu for seq %d dim %d bf16 %d\n", f, i, seq, dim, bf16);
                        return 1;
                    }
                }
                free(qkv);
                free(out);
                shapes++;
            }
        }
    }
    printf("%d shapes clean\n", shapes);
    return 0;
}
