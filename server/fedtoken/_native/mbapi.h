/* fedtoken._mbrsa's C API, exported as the capsule "fedtoken._mbrsa._C_API"
 * so that fedtoken._native can run multi-buffer RSA inside its own
 * GIL-released batch loop without linking crypto_mb itself.
 *
 * Every function here may be called without the GIL and from any thread:
 * keys are plain malloc'ed memory, immutable once made, and verify keeps its
 * state on the stack and in memory it allocates per call.
 */
#ifndef FEDTOKEN_MBAPI_H
#define FEDTOKEN_MBAPI_H

#include <stddef.h>
#include <stdint.h>

#define FEDTOKEN_MB_CAPSULE "fedtoken._mbrsa._C_API"
#define FEDTOKEN_MB_ABI 1

/* Per-item answers of verify. */
#define FEDTOKEN_MB_INVALID 0  /* decided: wrong length, s >= n, or not the encoding */
#define FEDTOKEN_MB_VALID 1
#define FEDTOKEN_MB_FALLBACK 2 /* not handled here: verify it with OpenSSL */

typedef struct fedtoken_mb_key fedtoken_mb_key;

typedef struct {
    int abi;    /* FEDTOKEN_MB_ABI */
    int usable; /* crypto_mb runs on this CPU in this build (decided at import) */
    /* A key from its big-endian modulus (leading zeros allowed) and whether
     * e == 65537; NULL when out of memory or n is zero or over 8192 bits. */
    fedtoken_mb_key *(*key_new)(const uint8_t *n_be, size_t n_len, int e_is_65537);
    void (*key_free)(fedtoken_mb_key *key);
    /* Whether crypto_mb takes this key's shape (e 65537, 2048/3072/4096, odd). */
    int (*key_supported)(const fedtoken_mb_key *key);
    /* RSASSA-PKCS1-v1_5 SHA-256 verification of count items: keys[i] (NULL:
     * fallback), sigs[i] of sig_lens[i] bytes, digests[i] 32 bytes. Writes
     * status[i]. Returns 0, or -1 when out of memory (items not done are
     * FALLBACK). */
    int (*verify)(const fedtoken_mb_key *const *keys, const uint8_t *const *sigs,
                  const size_t *sig_lens, const uint8_t *const *digests, size_t count,
                  uint8_t *status);
} fedtoken_mb_api;

#endif
