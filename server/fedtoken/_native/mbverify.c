/* fedtoken._mbrsa: multi-buffer RSASSA-PKCS1-v1_5 / SHA-256 verification
 * with Intel crypto_mb (AVX-512 IFMA), eight public operations per call.
 *
 * A separate extension module from fedtoken._native on purpose: it links a
 * static third-party library and may be built without it; keeping it apart
 * means the existing fast path is built, loaded and tested exactly as before
 * whatever happens here.
 *
 * API (see fedtoken.verifier.multibuffer for the Python side):
 *   KeyHandle(n: bytes, e: int)   an immutable RSA public key, its modulus
 *                                 converted once to crypto_mb's little-endian
 *                                 64-bit words; cheap to reuse per batch.
 *   verify_pkcs1_sha256_mb(items) -> bytes, one status byte per item:
 *       1  valid
 *       0  invalid (decided here: wrong signature length, s >= n, or the
 *          result is not the exact encoding we built)
 *       2  not handled: the caller must verify with OpenSSL (other exponent,
 *          other size, even modulus, no crypto_mb, no IFMA, library lane error)
 *     items: a sequence of (key, e, signature, digest) or (key, signature,
 *     digest) where key is a KeyHandle or big-endian modulus bytes (then e is
 *     required), signature is bytes and digest the 32-byte SHA-256 digest.
 *   MULTIBUFFER: str decided once at import: "crypto_mb AVX-512 IFMA" or
 *     "unavailable: <reason>".
 *
 * Verification never parses the decrypted block: we build the one canonical
 * EMSA-PKCS1-v1_5 encoding 00 01 FF..FF 00 || DigestInfo(SHA-256) || digest
 * of the modulus length ourselves and compare all of it (RFC 8017 8.2.2).
 *
 * No AVX-512 compiler flag is used for this file: crypto_mb dispatches on
 * the CPU itself, and if gcc were allowed to emit AVX-512 in our own code
 * the module would die with SIGILL on import on a CPU without it, instead
 * of reporting "unavailable" and answering 2.
 *
 * With the GIL released only immutable memory is read: the buffers of bytes
 * objects that this call holds references to (through the item tuples of the
 * sequence it holds), and keys, which never change once made.
 *
 *   _C_API: a capsule (mbapi.h) with the same GIL-free core for C callers:
 *     fedtoken._native runs it inside its own batch loop.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mbapi.h"

#ifdef FEDTOKEN_CRYPTO_MB
#include <crypto_mb/cpu_features.h>
#include <crypto_mb/rsa.h>
#include <crypto_mb/status.h>
#include <openssl/bn.h>
#endif

#define ST_INVALID FEDTOKEN_MB_INVALID
#define ST_VALID FEDTOKEN_MB_VALID
#define ST_FALLBACK FEDTOKEN_MB_FALLBACK

#define LANES 8
#define MAX_MOD_BYTES 1024      /* RSA-8192: larger moduli are refused */
#define MAX_MB_BYTES 512        /* RSA-4096, the largest crypto_mb method */
#define DIGEST_LEN 32
#define PUB65537 65537ULL

/* Whether crypto_mb can run here; set once in module init. */
static int mb_usable = 0;

/* ------------------------------------------------------------------ */
/* The C-level key and the GIL-free core (also the capsule's API)      */
/* ------------------------------------------------------------------ */

struct fedtoken_mb_key {
    size_t k;              /* modulus length in bytes (no leading zeros) */
    int bits;              /* exact bit length of n */
    int mb_bits;           /* 2048/3072/4096 if crypto_mb may take it, else 0 */
    uint8_t *n_be;         /* k bytes, big-endian, for the s < n check */
    uint64_t *n_le;        /* mb_bits/64 words, little-endian, or NULL */
};

static void
mb_key_free(fedtoken_mb_key *key)
{
    if (key != NULL) {
        free(key->n_be);
        free(key->n_le);
        free(key);
    }
}

static fedtoken_mb_key *
mb_key_new(const uint8_t *n, size_t n_len, int e_is_65537)
{
    /* Strip leading zero bytes: the modulus length is that of n itself. */
    while (n_len > 0 && n[0] == 0) {
        n++;
        n_len--;
    }
    if (n_len == 0 || n_len > MAX_MOD_BYTES) {
        return NULL;
    }
    fedtoken_mb_key *key = calloc(1, sizeof(*key));
    if (key == NULL) {
        return NULL;
    }
    int top = 0;
    for (uint8_t b = n[0]; b; b >>= 1) {
        top++;
    }
    key->k = n_len;
    key->bits = (int)((n_len - 1) * 8) + top;
    key->n_be = malloc(n_len);
    if (key->n_be == NULL) {
        mb_key_free(key);
        return NULL;
    }
    memcpy(key->n_be, n, n_len);
    int odd = (n[n_len - 1] & 1) != 0; /* Montgomery arithmetic needs odd n */
    if (e_is_65537 && odd && (key->bits == 2048 || key->bits == 3072 || key->bits == 4096)) {
        key->mb_bits = key->bits;
        size_t words = (size_t)key->mb_bits / 64;
        key->n_le = calloc(words, sizeof(uint64_t));
        if (key->n_le == NULL) {
            mb_key_free(key);
            return NULL;
        }
        /* Byte i from the end of the big-endian n is bit 8i: pack with
         * shifts so the result does not depend on host byte order. */
        for (size_t i = 0; i < n_len; i++) {
            uint8_t byte = n[n_len - 1 - i];
            key->n_le[i / 8] |= (uint64_t)byte << (8 * (i % 8));
        }
    }
    return key;
}

static int
mb_key_supported(const fedtoken_mb_key *key)
{
    return key != NULL && key->mb_bits != 0;
}

#ifdef FEDTOKEN_CRYPTO_MB
/* DER of DigestInfo for SHA-256 up to the digest itself (RFC 8017 9.2 n.1). */
static const uint8_t SHA256_DIGESTINFO[19] = {
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
    0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
};

/* Build EM = 00 01 FF..FF 00 || DigestInfo || digest into em[0..k). k is at
 * least 256 here (2048-bit moduli and up), far above the 62-byte minimum. */
static void
build_em(uint8_t *em, size_t k, const uint8_t *digest)
{
    size_t t = sizeof(SHA256_DIGESTINFO) + DIGEST_LEN;
    em[0] = 0x00;
    em[1] = 0x01;
    memset(em + 2, 0xFF, k - t - 3);
    em[k - t - 1] = 0x00;
    memcpy(em + k - t, SHA256_DIGESTINFO, sizeof(SHA256_DIGESTINFO));
    memcpy(em + k - DIGEST_LEN, digest, DIGEST_LEN);
}

/* Constant-time equality (public data, but there is no reason to leak). */
static int
equal_ct(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) {
        d |= (uint8_t)(a[i] ^ b[i]);
    }
    return d == 0;
}

static const mbx_RSA_Method *
method_for(int bits)
{
    switch (bits) {
    case 2048:
        return mbx_RSA2K_pub65537_Method();
    case 3072:
        return mbx_RSA3K_pub65537_Method();
    case 4096:
        return mbx_RSA4K_pub65537_Method();
    default:
        return NULL;
    }
}

/* Run the public operation over the items idx[0..count) (all of one size)
 * in calls of eight, writing each item's status. Unused lanes of the last
 * call repeat lane 0 into a scratch output, so every lane always holds a
 * well-formed operation. Returns 0, or -1 when out of memory (the items not
 * done keep FALLBACK). */
static int
run_size(int bits, const fedtoken_mb_key *const *keys, const uint8_t *const *sigs,
         const uint8_t *const *digests, const size_t *idx, size_t count, uint8_t *status)
{
    const mbx_RSA_Method *m = method_for(bits);
    if (m == NULL || count == 0) {
        return 0;
    }
    int bufsize = mbx_RSA_Method_BufSize(m);
    if (bufsize <= 0) {
        return 0;
    }
    /* aligned_alloc needs a size that is a multiple of the alignment. */
    size_t rounded = ((size_t)bufsize + 63) & ~(size_t)63;
    uint8_t *work = aligned_alloc(64, rounded);
    uint8_t (*out)[MAX_MB_BYTES] = malloc(sizeof(uint8_t[LANES + 1][MAX_MB_BYTES]));
    uint8_t *em = malloc(MAX_MB_BYTES);
    if (work == NULL || out == NULL || em == NULL) {
        free(work);
        free(out);
        free(em);
        return -1;
    }
    size_t k = (size_t)bits / 8;
    for (size_t base = 0; base < count; base += LANES) {
        const int8u *from[LANES];
        int8u *to[LANES];
        const int64u *n[LANES];
        size_t used = count - base < LANES ? count - base : LANES;
        for (size_t lane = 0; lane < LANES; lane++) {
            size_t i = idx[base + (lane < used ? lane : 0)];
            from[lane] = sigs[i];
            to[lane] = lane < used ? out[lane] : out[LANES];
            n[lane] = (const int64u *)keys[i]->n_le;
        }
        mbx_status st = mbx_rsa_public_mb8(from, to, n, bits, m, work);
        for (size_t lane = 0; lane < used; lane++) {
            size_t i = idx[base + lane];
            if (MBX_GET_STS(st, lane) != MBX_STATUS_OK) {
                status[i] = ST_FALLBACK; /* let OpenSSL decide */
                continue;
            }
            build_em(em, k, digests[i]);
            status[i] = equal_ct(out[lane], em, k) ? ST_VALID : ST_INVALID;
        }
    }
    /* The outputs are public (s^e mod n of public s), but wipe anyway. */
    memset(out, 0, sizeof(uint8_t[LANES + 1][MAX_MB_BYTES]));
    free(work);
    free(out);
    free(em);
    return 0;
}
#endif

/* Big-endian s < n for equal lengths. */
static int
less_than(const uint8_t *s, const uint8_t *n, size_t k)
{
    for (size_t i = 0; i < k; i++) {
        if (s[i] != n[i]) {
            return s[i] < n[i];
        }
    }
    return 0; /* equal */
}

/* The core, without the GIL: see fedtoken_mb_api.verify in mbapi.h. */
static int
mb_verify(const fedtoken_mb_key *const *keys, const uint8_t *const *sigs,
          const size_t *sig_lens, const uint8_t *const *digests, size_t count,
          uint8_t *status)
{
    memset(status, ST_FALLBACK, count);
    if (!mb_usable || count == 0) {
        return 0;
    }
    size_t *idx = malloc(count * sizeof(size_t));
    size_t *grouped = malloc(count * sizeof(size_t));
    if (idx == NULL || grouped == NULL) {
        free(idx);
        free(grouped);
        return -1;
    }
    size_t npending = 0;
    for (size_t i = 0; i < count; i++) {
        const fedtoken_mb_key *key = keys[i];
        if (key == NULL || !key->mb_bits) {
            continue; /* not ours: OpenSSL decides, whatever the bytes */
        }
        /* Refused before any arithmetic: only the modulus length, and only
         * integers below n (RFC 8017 5.2.2 step 1). */
        if (sig_lens[i] != key->k || !less_than(sigs[i], key->n_be, key->k)) {
            status[i] = ST_INVALID;
            continue;
        }
        idx[npending++] = i;
    }
    int rc = 0;
#ifdef FEDTOKEN_CRYPTO_MB
    /* One pass per size, order within a size kept. */
    static const int sizes[] = {2048, 3072, 4096};
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]) && rc == 0; s++) {
        size_t n = 0;
        for (size_t j = 0; j < npending; j++) {
            if (keys[idx[j]]->mb_bits == sizes[s]) {
                grouped[n++] = idx[j];
            }
        }
        rc = run_size(sizes[s], keys, sigs, digests, grouped, n, status);
    }
#else
    (void)digests;
#endif
    free(idx);
    free(grouped);
    return rc;
}

static fedtoken_mb_api mb_api = {
    .abi = FEDTOKEN_MB_ABI,
    .usable = 0, /* set in module init */
    .key_new = mb_key_new,
    .key_free = mb_key_free,
    .key_supported = mb_key_supported,
    .verify = mb_verify,
};

/* ------------------------------------------------------------------ */
/* KeyHandle                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    fedtoken_mb_key *key;  /* owned */
    PyObject *e_obj;       /* the exponent as given (a Python int) */
} KeyHandle;

static PyTypeObject KeyHandleType;

static void
KeyHandle_dealloc(KeyHandle *self)
{
    mb_key_free(self->key);
    Py_XDECREF(self->e_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static KeyHandle *
key_new_from(const uint8_t *n, Py_ssize_t n_len, PyObject *e)
{
    if (!PyLong_Check(e)) {
        PyErr_SetString(PyExc_TypeError, "exponent must be an int");
        return NULL;
    }
    /* e == 65537 exactly? Overflow means a huge exponent: not ours. */
    int overflow = 0;
    long long ev = PyLong_AsLongLongAndOverflow(e, &overflow);
    if (ev == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow < 0 || (!overflow && ev <= 0)) {
        PyErr_SetString(PyExc_ValueError, "exponent must be positive");
        return NULL;
    }
    Py_ssize_t stripped = n_len;
    const uint8_t *p = n;
    while (stripped > 0 && p[0] == 0) {
        p++;
        stripped--;
    }
    if (stripped == 0) {
        PyErr_SetString(PyExc_ValueError, "modulus must be non-zero");
        return NULL;
    }
    if (stripped > MAX_MOD_BYTES) {
        PyErr_SetString(PyExc_ValueError, "modulus longer than 8192 bits");
        return NULL;
    }
    fedtoken_mb_key *key =
        mb_key_new(p, (size_t)stripped, !overflow && (unsigned long long)ev == PUB65537);
    if (key == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    KeyHandle *self = PyObject_New(KeyHandle, &KeyHandleType);
    if (self == NULL) {
        mb_key_free(key);
        return NULL;
    }
    self->key = key;
    self->e_obj = Py_NewRef(e);
    return self;
}

static PyObject *
KeyHandle_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", "e", NULL};
    Py_buffer n;
    PyObject *e;
    (void)type; /* not a base type: always KeyHandleType */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*O:KeyHandle", kwlist, &n, &e)) {
        return NULL;
    }
    KeyHandle *self = key_new_from(n.buf, n.len, e);
    PyBuffer_Release(&n);
    return (PyObject *)self;
}

static PyObject *
KeyHandle_get_bits(KeyHandle *self, void *closure)
{
    (void)closure;
    return PyLong_FromLong(self->key->bits);
}

static PyObject *
KeyHandle_get_e(KeyHandle *self, void *closure)
{
    (void)closure;
    return Py_NewRef(self->e_obj);
}

static PyObject *
KeyHandle_get_supported(KeyHandle *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->key->mb_bits != 0);
}

static PyObject *
KeyHandle_get_n(KeyHandle *self, void *closure)
{
    (void)closure;
    return PyBytes_FromStringAndSize((const char *)self->key->n_be, (Py_ssize_t)self->key->k);
}

static PyObject *
KeyHandle_repr(KeyHandle *self)
{
    return PyUnicode_FromFormat("<KeyHandle RSA-%d e=%R%s>", self->key->bits, self->e_obj,
                                self->key->mb_bits ? " multi-buffer" : "");
}

static PyGetSetDef KeyHandle_getset[] = {
    {"bits", (getter)KeyHandle_get_bits, NULL, "exact bit length of the modulus", NULL},
    {"e", (getter)KeyHandle_get_e, NULL, "the public exponent", NULL},
    {"n", (getter)KeyHandle_get_n, NULL, "the modulus, big-endian, no leading zeros", NULL},
    {"supported", (getter)KeyHandle_get_supported, NULL,
     "True when the key's shape (e = 65537, 2048/3072/4096 bits, odd n) is one "
     "crypto_mb takes; whether the CPU can is MULTIBUFFER's business",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KeyHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fedtoken._mbrsa.KeyHandle",
    .tp_basicsize = sizeof(KeyHandle),
    .tp_dealloc = (destructor)KeyHandle_dealloc,
    .tp_repr = (reprfunc)KeyHandle_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "KeyHandle(n: bytes, e: int): an RSA public key prepared once for "
              "verify_pkcs1_sha256_mb (modulus big-endian).",
    .tp_getset = KeyHandle_getset,
    .tp_new = KeyHandle_new,
};

/* ------------------------------------------------------------------ */
/* verify_pkcs1_sha256_mb                                              */
/* ------------------------------------------------------------------ */

/* Read one bytes member, or -1 with TypeError. */
static int
get_bytes(PyObject *o, const char *what, const uint8_t **buf, Py_ssize_t *len)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *buf = (const uint8_t *)PyBytes_AS_STRING(o);
    *len = PyBytes_GET_SIZE(o);
    return 0;
}

PyDoc_STRVAR(verify_doc,
"verify_pkcs1_sha256_mb(items) -> bytes\n\n"
"RSASSA-PKCS1-v1_5 SHA-256 verification, eight at a time with crypto_mb.\n"
"items: sequence of (key, e, signature, digest) or (KeyHandle, signature,\n"
"digest); key is a KeyHandle (e then None or equal to its exponent) or the\n"
"big-endian modulus as bytes. One byte per item: 1 valid, 0 invalid,\n"
"2 not handled here (verify it with OpenSSL).");

/* Parses the items, then runs the same GIL-free core as the capsule's
 * verify. The signature and digest pointers point into bytes objects that
 * the tuples of ``seq`` (held) keep alive; bytes are immutable. */
static PyObject *
verify_pkcs1_sha256_mb(PyObject *module, PyObject *arg)
{
    (void)module;
    PyObject *seq = PySequence_Fast(arg, "items must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = PyBytes_FromStringAndSize(NULL, count);
    PyObject *ret = NULL; /* result once everything succeeded */
    KeyHandle **handles = NULL;
    const fedtoken_mb_key **keys = NULL;
    const uint8_t **sigs = NULL, **digests = NULL;
    size_t *sig_lens = NULL;
    if (result == NULL) {
        goto done;
    }
    uint8_t *status = (uint8_t *)PyBytes_AS_STRING(result);
    if (count == 0) {
        ret = result;
        result = NULL;
        goto done;
    }
    size_t n = (size_t)count;
    handles = PyMem_Calloc(n, sizeof(KeyHandle *));
    keys = PyMem_Calloc(n, sizeof(fedtoken_mb_key *));
    sigs = PyMem_Calloc(n, sizeof(uint8_t *));
    digests = PyMem_Calloc(n, sizeof(uint8_t *));
    sig_lens = PyMem_Calloc(n, sizeof(size_t));
    if (!handles || !keys || !sigs || !digests || !sig_lens) {
        PyErr_NoMemory();
        goto done;
    }

    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) ||
            (PyTuple_GET_SIZE(item) != 3 && PyTuple_GET_SIZE(item) != 4)) {
            PyErr_Format(PyExc_TypeError, "item %zd must be a tuple of 3 or 4", i);
            goto done;
        }
        int four = PyTuple_GET_SIZE(item) == 4;
        PyObject *key_obj = PyTuple_GET_ITEM(item, 0);
        PyObject *e_obj = four ? PyTuple_GET_ITEM(item, 1) : Py_None;
        PyObject *sig_obj = PyTuple_GET_ITEM(item, four ? 2 : 1);
        PyObject *dig_obj = PyTuple_GET_ITEM(item, four ? 3 : 2);
        const uint8_t *sig, *dig;
        Py_ssize_t sig_len, dig_len;
        if (get_bytes(sig_obj, "signature", &sig, &sig_len) < 0 ||
            get_bytes(dig_obj, "digest", &dig, &dig_len) < 0) {
            goto done;
        }
        if (dig_len != DIGEST_LEN) {
            PyErr_Format(PyExc_ValueError, "item %zd: digest must be 32 bytes", i);
            goto done;
        }
        KeyHandle *key;
        if (Py_IS_TYPE(key_obj, &KeyHandleType)) {
            key = (KeyHandle *)Py_NewRef(key_obj);
            if (e_obj != Py_None) {
                int same = PyObject_RichCompareBool(e_obj, key->e_obj, Py_EQ);
                if (same != 1) {
                    Py_DECREF(key);
                    if (same == 0) {
                        PyErr_Format(PyExc_ValueError,
                                     "item %zd: exponent differs from the KeyHandle's", i);
                    }
                    goto done;
                }
            }
        } else if (PyBytes_Check(key_obj)) {
            if (e_obj == Py_None) {
                PyErr_Format(PyExc_TypeError, "item %zd: a bytes modulus needs an exponent", i);
                goto done;
            }
            key = key_new_from((const uint8_t *)PyBytes_AS_STRING(key_obj),
                               PyBytes_GET_SIZE(key_obj), e_obj);
            if (key == NULL) {
                goto done;
            }
        } else {
            PyErr_Format(PyExc_TypeError, "item %zd: key must be a KeyHandle or bytes", i);
            goto done;
        }
        handles[i] = key; /* reference moves into handles */
        keys[i] = key->key;
        sigs[i] = sig;
        sig_lens[i] = (size_t)sig_len;
        digests[i] = dig;
    }

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = mb_verify(keys, sigs, sig_lens, digests, n, status);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    ret = result;
    result = NULL;

done:
    /* One exit: ret is the answer, or NULL with an exception set. */
    if (handles != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_XDECREF(handles[i]);
        }
    }
    PyMem_Free(handles);
    PyMem_Free(keys);
    PyMem_Free(sigs);
    PyMem_Free(digests);
    PyMem_Free(sig_lens);
    Py_XDECREF(result);
    Py_DECREF(seq);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Module                                                              */
/* ------------------------------------------------------------------ */

#ifdef FEDTOKEN_CRYPTO_MB
/* Known-answer check at import: eight 2048-bit lanes through crypto_mb
 * against OpenSSL's BN_mod_exp. A modulus need not be prime for s^e mod n,
 * only odd, so a fixed pattern is enough. Returns 1 when they agree. */
static int
self_test(void)
{
    enum { K = 256 };
    uint8_t n_be[K], s_be[LANES][K], out[LANES][K], ref[K];
    int64u n_le[K / 8];
    for (int i = 0; i < K; i++) {
        n_be[i] = (uint8_t)(0xC3 ^ (i * 37));
    }
    n_be[0] |= 0x80; /* exactly 2048 bits */
    n_be[K - 1] |= 1; /* odd */
    memset(n_le, 0, sizeof(n_le));
    for (int i = 0; i < K; i++) {
        n_le[i / 8] |= (int64u)n_be[K - 1 - i] << (8 * (i % 8));
    }
    for (int lane = 0; lane < LANES; lane++) {
        for (int i = 0; i < K; i++) {
            s_be[lane][i] = (uint8_t)(lane * 29 + i * 11 + 5);
        }
        s_be[lane][0] = 0x01 + (uint8_t)lane; /* below n */
    }
    const mbx_RSA_Method *m = mbx_RSA2K_pub65537_Method();
    int bufsize = mbx_RSA_Method_BufSize(m);
    if (bufsize <= 0) {
        return 0;
    }
    size_t rounded = ((size_t)bufsize + 63) & ~(size_t)63;
    uint8_t *work = aligned_alloc(64, rounded);
    BN_CTX *ctx = BN_CTX_new();
    BIGNUM *bn = BN_bin2bn(n_be, K, NULL), *be = BN_new(), *bs = BN_new(), *br = BN_new();
    int ok = work != NULL && ctx != NULL && bn != NULL && be != NULL && bs != NULL &&
             br != NULL && BN_set_word(be, 65537);
    if (ok) {
        const int8u *from[LANES];
        int8u *to[LANES];
        const int64u *np[LANES];
        for (int lane = 0; lane < LANES; lane++) {
            from[lane] = s_be[lane];
            to[lane] = out[lane];
            np[lane] = n_le;
        }
        ok = mbx_rsa_public_mb8(from, to, np, 2048, m, work) == MBX_STATUS_OK;
        for (int lane = 0; ok && lane < LANES; lane++) {
            ok = BN_bin2bn(s_be[lane], K, bs) != NULL &&
                 BN_mod_exp(br, bs, be, bn, ctx) == 1 && BN_bn2binpad(br, ref, K) == K &&
                 memcmp(ref, out[lane], K) == 0;
        }
    }
    BN_free(bn);
    BN_free(be);
    BN_free(bs);
    BN_free(br);
    BN_CTX_free(ctx);
    free(work);
    return ok;
}
#endif

/* Decide once whether the multi-buffer path runs, and say why not. */
static PyObject *
decide_status(void)
{
    const char *env = getenv("FEDTOKEN_MULTIBUFFER");
    if (env != NULL && strcmp(env, "off") == 0) {
        return PyUnicode_FromString("unavailable: disabled by FEDTOKEN_MULTIBUFFER=off");
    }
#ifdef FEDTOKEN_CRYPTO_MB
    if (!mbx_is_crypto_mb_applicable(0)) {
        return PyUnicode_FromString("unavailable: CPU lacks AVX-512 IFMA");
    }
    if (!self_test()) {
        return PyUnicode_FromString("unavailable: crypto_mb self-test failed");
    }
    mb_usable = 1;
    return PyUnicode_FromString("crypto_mb AVX-512 IFMA");
#else
    return PyUnicode_FromString("unavailable: built without crypto_mb");
#endif
}

static PyMethodDef module_methods[] = {
    {"verify_pkcs1_sha256_mb", verify_pkcs1_sha256_mb, METH_O, verify_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mbrsa_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fedtoken._mbrsa",
    .m_doc = "Multi-buffer RSA PKCS#1 v1.5 SHA-256 verification (Intel crypto_mb).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__mbrsa(void)
{
    if (PyType_Ready(&KeyHandleType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&mbrsa_module);
    if (m == NULL) {
        return NULL;
    }
    PyObject *st = decide_status();
    if (st == NULL || PyModule_AddObject(m, "MULTIBUFFER", st) < 0) {
        Py_XDECREF(st);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "KeyHandle", (PyObject *)&KeyHandleType) < 0 ||
        PyModule_AddIntConstant(m, "VALID", ST_VALID) < 0 ||
        PyModule_AddIntConstant(m, "INVALID", ST_INVALID) < 0 ||
        PyModule_AddIntConstant(m, "FALLBACK", ST_FALLBACK) < 0 ||
        PyModule_AddIntConstant(m, "LANES", LANES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    mb_api.usable = mb_usable;
    PyObject *capsule = PyCapsule_New(&mb_api, FEDTOKEN_MB_CAPSULE, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
