/* fedtoken._native: the optional native fast path of the verification engine.
 *
 * For a run of tokens, with the GIL released for the whole run: split the
 * compact JWS, look its exact header segment up in a table the Python side
 * prepared (header bytes -> key slot; ALL header policy stays in Python),
 * decode payload and signature with the strict unpadded base64url contract
 * of fedtoken.core.jwk.b64url_decode and hash the signing input (phase one,
 * every token); then verify RSASSA-PKCS1-v1_5 SHA-256 (phase two): the
 * tokens of keys crypto_mb takes go through fedtoken._mbrsa's multi-buffer
 * core (its C API, mbapi.h: eight per operation, any mix of keys, the whole
 * encoding compared, s >= n refused first) when it runs on this CPU, the
 * others, and any it does not decide, through the slot's EVP_PKEY.
 *
 * Per token the answer is one status byte:
 *   0                      fallback: Python must take the whole token
 *   1 + slot               signature valid (payload bytes returned)
 *   0x80 | (1 + slot)      signature invalid (payload bytes returned)
 * Anything unusual (non-str, non-ASCII, too long, not three segments, empty
 * segment, unknown header, bad base64url, wrong signature length, library
 * error) is a fallback: the Python path then gives the verdict, so the
 * verdicts of both paths cannot differ on odd inputs.
 *
 * No Python object is touched while the GIL is released: token pointers are
 * the data of exact, compact-ASCII str objects whose references this call
 * holds; every output goes to memory this call allocated.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <stdint.h>
#include <string.h>

#include "mbapi.h"

#define MAX_SLOTS 127        /* status byte: 1 + slot fits in 7 bits */
#define MAX_HEADER_LEN 4096  /* longer header segments are never tabled */
#define MAX_SIG_BYTES 1024   /* RSA-8192; larger keys are never tabled */
#define ST_FALLBACK 0
#define ST_INVALID 0x80

static EVP_MD *sha256_md = NULL;

/* fedtoken._mbrsa's C API when that module imports and crypto_mb runs on
 * this CPU (looked up once, at the first KeyTable); NULL otherwise, and then
 * every signature goes to OpenSSL. */
static const fedtoken_mb_api *mb_api = NULL;
static int mb_looked_up = 0;

static const fedtoken_mb_api *
multibuffer_api(void)
{
    if (!mb_looked_up) {
        mb_looked_up = 1;
        /* PyCapsule_Import walks attributes from the package down, so the
         * submodule must be imported first. */
        PyObject *mod = PyImport_ImportModule("fedtoken._mbrsa");
        const fedtoken_mb_api *api = NULL;
        if (mod != NULL) {
            api = PyCapsule_Import(FEDTOKEN_MB_CAPSULE, 0);
            Py_DECREF(mod);
        }
        if (api == NULL) {
            PyErr_Clear();
        }
        else if (api->abi == FEDTOKEN_MB_ABI && api->usable) {
            mb_api = api;
        }
    }
    return mb_api;
}

/* base64url alphabet value, or 0xFF */
static uint8_t b64_value[256];

static void
init_b64(void)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    memset(b64_value, 0xFF, sizeof(b64_value));
    for (int i = 0; i < 64; i++) {
        b64_value[(unsigned char)alphabet[i]] = (uint8_t)i;
    }
}

/* Decoded length of an unpadded base64url text of n characters, or -1 when
 * n % 4 == 1 (never a valid length). */
static Py_ssize_t
b64_decoded_len(Py_ssize_t n)
{
    Py_ssize_t rem = n % 4;
    if (rem == 1) {
        return -1;
    }
    return (n / 4) * 3 + (rem ? rem - 1 : 0);
}

/* Strict unpadded base64url decode of in[0:n] into out (room for exactly
 * b64_decoded_len(n) bytes, which the caller checked). 0 on success, -1 on
 * any character outside the url alphabet or non-canonical trailing bits. */
static int
b64_decode(const unsigned char *in, Py_ssize_t n, unsigned char *out)
{
    Py_ssize_t full = n / 4, rem = n % 4, i;
    unsigned char *o = out;
    if (rem == 1) {
        return -1;
    }
    for (i = 0; i < full; i++) {
        const unsigned char *p = in + 4 * i;
        uint32_t a = b64_value[p[0]], b = b64_value[p[1]];
        uint32_t c = b64_value[p[2]], d = b64_value[p[3]];
        if ((a | b | c | d) & 0x80) {
            return -1;
        }
        uint32_t v = (a << 18) | (b << 12) | (c << 6) | d;
        o[0] = (unsigned char)(v >> 16);
        o[1] = (unsigned char)(v >> 8);
        o[2] = (unsigned char)v;
        o += 3;
    }
    if (rem) {
        const unsigned char *p = in + 4 * full;
        uint32_t a = b64_value[p[0]], b = b64_value[p[1]];
        uint32_t c = rem == 3 ? b64_value[p[2]] : 0;
        if ((a | b | c) & 0x80) {
            return -1;
        }
        if (rem == 2) {
            if (b & 0x0F) {
                return -1; /* non-canonical trailing bits */
            }
            o[0] = (unsigned char)((a << 2) | (b >> 4));
        }
        else {
            if (c & 0x03) {
                return -1;
            }
            uint32_t v = (a << 18) | (b << 12) | (c << 6);
            o[0] = (unsigned char)(v >> 16);
            o[1] = (unsigned char)(v >> 8);
        }
    }
    return 0;
}

/* --- KeyTable ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_ssize_t count;
    Py_ssize_t max_token;
    unsigned char **headers;  /* owned copies of the header segments */
    Py_ssize_t *header_lens;
    EVP_PKEY **keys;
    Py_ssize_t *sig_lens;     /* modulus bytes of each key */
    fedtoken_mb_key **mb_keys; /* per slot: crypto_mb's key, or NULL (OpenSSL) */
    const fedtoken_mb_api *mb; /* set when any slot has an mb key */
    Py_ssize_t mb_slots;
    uint64_t *key_fps;        /* per slot: the first 8 bytes of SHA-256(DER) | 1 */
} KeyTable;

static void
KeyTable_dealloc(KeyTable *self)
{
    for (Py_ssize_t i = 0; i < self->count; i++) {
        if (self->headers) {
            PyMem_Free(self->headers[i]);
        }
        if (self->keys) {
            EVP_PKEY_free(self->keys[i]);
        }
        if (self->mb_keys && self->mb_keys[i] && self->mb) {
            self->mb->key_free(self->mb_keys[i]);
        }
    }
    PyMem_Free(self->mb_keys);
    PyMem_Free(self->headers);
    PyMem_Free(self->header_lens);
    PyMem_Free(self->keys);
    PyMem_Free(self->sig_lens);
    PyMem_Free(self->key_fps);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* crypto_mb's key for an RSA EVP_PKEY into *out: NULL when crypto_mb does
 * not take its shape (then OpenSSL verifies). -1 only when out of memory. */
static int
mb_key_of(const fedtoken_mb_api *api, EVP_PKEY *pkey, fedtoken_mb_key **out)
{
    BIGNUM *n = NULL, *e = NULL;
    unsigned char buf[MAX_SIG_BYTES];
    int rc = 0;
    *out = NULL;
    if (EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &n) != 1 ||
        EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, &e) != 1) {
        ERR_clear_error();
        goto done; /* not readable: OpenSSL path */
    }
    int len = BN_num_bytes(n);
    if (len <= 0 || len > MAX_SIG_BYTES || BN_bn2bin(n, buf) != len) {
        goto done;
    }
    fedtoken_mb_key *key = api->key_new(buf, (size_t)len, BN_is_word(e, 65537));
    if (key == NULL) {
        rc = -1;
        goto done;
    }
    if (!api->key_supported(key)) {
        api->key_free(key);
        goto done;
    }
    *out = key;
done:
    BN_free(n);
    BN_free(e);
    return rc;
}

static PyObject *
KeyTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", "max_token_size", "multibuffer", NULL};
    PyObject *entries = NULL, *seq = NULL;
    Py_ssize_t max_token = 0;
    int want_mb = 1;
    KeyTable *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p:KeyTable", kwlist, &entries,
                                     &max_token, &want_mb)) {
        return NULL;
    }
    if (max_token < 0) {
        PyErr_SetString(PyExc_ValueError, "max_token_size must be >= 0");
        return NULL;
    }
    seq = PySequence_Fast(entries, "entries must be a sequence of (header, spki_der)");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_SLOTS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many key slots");
        return NULL;
    }
    self = (KeyTable *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    self->max_token = max_token;
    self->count = 0;
    Py_ssize_t alloc = n > 0 ? n : 1;
    self->headers = PyMem_Calloc((size_t)alloc, sizeof(unsigned char *));
    self->header_lens = PyMem_Calloc((size_t)alloc, sizeof(Py_ssize_t));
    self->keys = PyMem_Calloc((size_t)alloc, sizeof(EVP_PKEY *));
    self->sig_lens = PyMem_Calloc((size_t)alloc, sizeof(Py_ssize_t));
    self->mb_keys = PyMem_Calloc((size_t)alloc, sizeof(fedtoken_mb_key *));
    self->mb = want_mb ? multibuffer_api() : NULL;
    self->mb_slots = 0;
    self->key_fps = PyMem_Calloc((size_t)alloc, sizeof(uint64_t));
    if (!self->headers || !self->header_lens || !self->keys || !self->sig_lens ||
        !self->mb_keys || !self->key_fps) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        const char *hdr, *der;
        Py_ssize_t hdr_len, der_len;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "entries must be (bytes, bytes) tuples");
            goto fail;
        }
        hdr = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        hdr_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        der = PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 1));
        der_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1));
        if (hdr_len <= 0 || hdr_len > MAX_HEADER_LEN || der_len <= 0 || der_len > 1 << 16) {
            PyErr_SetString(PyExc_ValueError, "header or key of unsupported length");
            goto fail;
        }
        const unsigned char *p = (const unsigned char *)der;
        EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, (long)der_len);
        if (pkey == NULL || p != (const unsigned char *)der + der_len ||
            EVP_PKEY_get_base_id(pkey) != EVP_PKEY_RSA) {
            EVP_PKEY_free(pkey);
            ERR_clear_error();
            PyErr_SetString(PyExc_ValueError, "key is not a DER RSA SubjectPublicKeyInfo");
            goto fail;
        }
        int size = EVP_PKEY_get_size(pkey);
        if (size <= 0 || size > MAX_SIG_BYTES) {
            EVP_PKEY_free(pkey);
            PyErr_SetString(PyExc_ValueError, "RSA key of unsupported size");
            goto fail;
        }
        unsigned char *copy = PyMem_Malloc((size_t)hdr_len);
        if (copy == NULL) {
            EVP_PKEY_free(pkey);
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(copy, hdr, (size_t)hdr_len);
        self->headers[i] = copy;
        self->header_lens[i] = hdr_len;
        self->keys[i] = pkey;
        self->sig_lens[i] = size;
        unsigned char fp[32];
        unsigned int fp_len = 0;
        if (EVP_Digest(der, (size_t)der_len, fp, &fp_len, sha256_md, NULL) != 1 || fp_len != 32) {
            ERR_clear_error();
            PyErr_SetString(PyExc_ValueError, "cannot hash the key");
            goto fail;
        }
        uint64_t v = 0;
        for (int k = 0; k < 8; k++) {
            v = (v << 8) | fp[k];
        }
        self->key_fps[i] = v | 1; /* never 0: 0 marks an empty cache way */
        self->count = i + 1;
        if (self->mb != NULL && mb_key_of(self->mb, pkey, &self->mb_keys[i]) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
        if (self->mb_keys[i] != NULL) {
            self->mb_slots++;
        }
    }
    Py_DECREF(seq);
    return (PyObject *)self;
fail:
    Py_DECREF(seq);
    Py_DECREF(self);
    return NULL;
}

/* Per-call state: one verify context per slot, created when first used. */
typedef struct {
    EVP_PKEY_CTX *ctx[MAX_SLOTS];
    int failed[MAX_SLOTS];
    EVP_MD_CTX *md;
} CallState;

static EVP_PKEY_CTX *
slot_ctx(const KeyTable *t, CallState *cs, Py_ssize_t slot)
{
    if (cs->ctx[slot] != NULL) {
        return cs->ctx[slot];
    }
    if (cs->failed[slot]) {
        return NULL;
    }
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(t->keys[slot], NULL);
    if (ctx == NULL || EVP_PKEY_verify_init(ctx) <= 0 ||
        EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(ctx, sha256_md) <= 0) {
        EVP_PKEY_CTX_free(ctx);
        ERR_clear_error();
        cs->failed[slot] = 1;
        return NULL;
    }
    cs->ctx[slot] = ctx;
    return ctx;
}

/* Phase one for one token, no GIL: split, look the header up, decode the
 * signature into sig (room for MAX_SIG_BYTES) and the payload into payload
 * (room for b64_decoded_len of the payload segment, bounded by len), and
 * hash the signing input into digest. Returns the slot, or -1: fallback. */
static Py_ssize_t
prepare_one(const KeyTable *t, EVP_MD_CTX *md, const unsigned char *tok, Py_ssize_t len,
            unsigned char *sig, unsigned char *payload, Py_ssize_t *payload_len,
            unsigned char *digest)
{
    const unsigned char *dot1, *dot2;
    Py_ssize_t h_len, p_len, s_len, slot, want;
    unsigned int digest_len = 0;

    if (len <= 0 || len > t->max_token) {
        return -1;
    }
    dot1 = memchr(tok, '.', (size_t)len);
    if (dot1 == NULL) {
        return -1;
    }
    h_len = dot1 - tok;
    dot2 = memchr(dot1 + 1, '.', (size_t)(len - h_len - 1));
    if (dot2 == NULL) {
        return -1;
    }
    p_len = dot2 - (dot1 + 1);
    s_len = len - (dot2 - tok) - 1;
    if (h_len == 0 || p_len == 0 || s_len == 0 ||
        memchr(dot2 + 1, '.', (size_t)s_len) != NULL) {
        return -1;
    }
    for (slot = 0; slot < t->count; slot++) {
        if (t->header_lens[slot] == h_len && memcmp(t->headers[slot], tok, (size_t)h_len) == 0) {
            break;
        }
    }
    if (slot == t->count) {
        return -1;
    }
    want = t->sig_lens[slot];
    if (b64_decoded_len(s_len) != want || want > MAX_SIG_BYTES) {
        return -1;
    }
    if (b64_decode(dot2 + 1, s_len, sig) != 0) {
        return -1;
    }
    Py_ssize_t plen = b64_decoded_len(p_len);
    if (plen < 0 || plen > len) {
        return -1;
    }
    if (b64_decode(dot1 + 1, p_len, payload) != 0) {
        return -1;
    }
    *payload_len = plen;
    /* SHA-256 of the signing input. */
    if (EVP_DigestInit_ex(md, sha256_md, NULL) <= 0 ||
        EVP_DigestUpdate(md, tok, (size_t)(dot2 - tok)) <= 0 ||
        EVP_DigestFinal_ex(md, digest, &digest_len) <= 0 || digest_len != 32) {
        ERR_clear_error();
        return -1;
    }
    return slot;
}

/* The OpenSSL check of one prepared token's signature: its status byte. */
static uint8_t
openssl_verify(const KeyTable *t, CallState *cs, Py_ssize_t slot, const unsigned char *sig,
               const unsigned char *digest)
{
    EVP_PKEY_CTX *ctx = slot_ctx(t, cs, slot);
    if (ctx == NULL) {
        return ST_FALLBACK;
    }
    int rc = EVP_PKEY_verify(ctx, sig, (size_t)t->sig_lens[slot], digest, 32);
    if (rc == 1) {
        return (uint8_t)(1 + slot);
    }
    /* A signature that does not verify leaves errors on this thread's queue:
     * clear them so no later OpenSSL user on this thread sees them. */
    ERR_clear_error();
    return rc == 0 ? (uint8_t)(ST_INVALID | (1 + slot)) : ST_FALLBACK;
}

/* The signature checks of a prepared run, no GIL: the tokens whose slot has
 * a crypto_mb key go through the multi-buffer core, eight per operation
 * (any mix of keys); the rest, and any it does not decide, through OpenSSL.
 * slots[i] < 0 marks a fallback. Returns 0, or -1 when out of memory. */
static int
verify_prepared(const KeyTable *t, CallState *cs, Py_ssize_t n, const Py_ssize_t *slots,
                unsigned char *const *sigs, const unsigned char *digests, uint8_t *status)
{
    Py_ssize_t i, m = 0;
    uint8_t *mb_status = NULL;
    const fedtoken_mb_key **mb_keys = NULL;
    const uint8_t **mb_sigs = NULL, **mb_digests = NULL;
    size_t *mb_lens = NULL;
    Py_ssize_t *mb_index = NULL;

    if (t->mb != NULL && t->mb_slots > 0) {
        for (i = 0; i < n; i++) {
            if (slots[i] >= 0 && t->mb_keys[slots[i]] != NULL) {
                m++;
            }
        }
        /* One operation of eight lanes costs about as much as two OpenSSL
         * verifications: a lone signature (a unary call, or the last one of
         * a run) is cheaper through OpenSSL. */
        if (m % 8 == 1) {
            m--;
        }
    }
    if (m > 0) {
        size_t cnt = (size_t)m;
        mb_status = malloc(cnt);
        mb_keys = malloc(cnt * sizeof(*mb_keys));
        mb_sigs = malloc(cnt * sizeof(*mb_sigs));
        mb_digests = malloc(cnt * sizeof(*mb_digests));
        mb_lens = malloc(cnt * sizeof(*mb_lens));
        mb_index = malloc(cnt * sizeof(*mb_index));
        if (!mb_status || !mb_keys || !mb_sigs || !mb_digests || !mb_lens || !mb_index) {
            m = -1;
            goto done;
        }
        Py_ssize_t j = 0;
        for (i = 0; i < n && j < m; i++) {
            if (slots[i] >= 0 && t->mb_keys[slots[i]] != NULL) {
                mb_keys[j] = t->mb_keys[slots[i]];
                mb_sigs[j] = sigs[i];
                mb_lens[j] = (size_t)t->sig_lens[slots[i]];
                mb_digests[j] = digests + 32 * i;
                mb_index[j] = i;
                j++;
            }
        }
        if (t->mb->verify(mb_keys, mb_sigs, mb_lens, mb_digests, cnt, mb_status) < 0) {
            m = -1;
            goto done;
        }
    }
    /* status: 0xFF = not decided yet. */
    for (i = 0; i < n; i++) {
        status[i] = slots[i] < 0 ? ST_FALLBACK : 0xFF;
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        Py_ssize_t k = mb_index[j], slot = slots[k];
        if (mb_status[j] == FEDTOKEN_MB_VALID) {
            status[k] = (uint8_t)(1 + slot);
        }
        else if (mb_status[j] == FEDTOKEN_MB_INVALID) {
            status[k] = (uint8_t)(ST_INVALID | (1 + slot));
        }
    }
    for (i = 0; i < n; i++) {
        if (status[i] == 0xFF) {
            status[i] = openssl_verify(t, cs, slots[i], sigs[i], digests + 32 * i);
        }
    }
done:
    free(mb_status);
    free(mb_keys);
    free(mb_sigs);
    free(mb_digests);
    free(mb_lens);
    free(mb_index);
    return m < 0 ? -1 : 0;
}


/* --- flat claims scanner ---------------------------------------------------
 *
 * The payload of almost every token is one flat JSON object whose values are
 * printable-ASCII strings without escapes, integers, true/false/null, or
 * arrays of such strings (aud). For exactly that shape this builds the dict
 * json.loads would build (same keys, values, types and order); anything else
 * (escapes, non-ASCII, floats, exponents, long integers, nesting, duplicate
 * names, a BOM, any syntax error) returns NULL with no exception set, and
 * the Python side parses the payload with core.jose.loads_strict as before.
 * NULL with an exception set is a real error (memory).
 */

#define MAX_MEMBERS 64
#define MAX_INT_DIGITS 18

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Cursor;

static void
skip_ws(Cursor *c)
{
    while (c->p < c->end &&
           (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) {
        c->p++;
    }
}

/* A string of printable ASCII without escapes; c->p at the opening quote.
 * On success *s, *len are its contents and c->p is past the closing quote. */
static int
scan_string(Cursor *c, const unsigned char **s, Py_ssize_t *len)
{
    if (c->p >= c->end || *c->p != '"') {
        return -1;
    }
    const unsigned char *start = ++c->p;
    while (c->p < c->end) {
        unsigned char ch = *c->p;
        if (ch == '"') {
            *s = start;
            *len = c->p - start;
            c->p++;
            return 0;
        }
        if (ch < 0x20 || ch > 0x7E || ch == '\\') {
            return -1;
        }
        c->p++;
    }
    return -1;
}

static int
is_delim(const Cursor *c)
{
    if (c->p >= c->end) {
        return 1;
    }
    unsigned char ch = *c->p;
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == ',' || ch == '}' ||
           ch == ']';
}

static int
literal(Cursor *c, const char *word, size_t n)
{
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0) {
        return 0;
    }
    c->p += n;
    return is_delim(c);
}

static PyObject *
ascii_str(const unsigned char *s, Py_ssize_t len)
{
    return PyUnicode_DecodeASCII((const char *)s, len, NULL);
}

/* An integer of at most MAX_INT_DIGITS digits, as json.loads reads one;
 * c->p at '-' or the first digit. 0, or -1 for "-", "01", fractions,
 * exponents and longer numbers (the scanner's fallback). */
static int
scan_int(Cursor *c, long long *out)
{
    int neg = 0;
    if (c->p < c->end && *c->p == '-') {
        neg = 1;
        c->p++;
    }
    const unsigned char *digits = c->p;
    long long v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        if (c->p - digits >= MAX_INT_DIGITS) {
            return -1;
        }
        v = v * 10 + (*c->p - '0');
        c->p++;
    }
    Py_ssize_t nd = c->p - digits;
    if (nd == 0 || (nd > 1 && digits[0] == '0') || !is_delim(c)) {
        return -1;
    }
    *out = neg ? -v : v;
    return 0;
}

/* One value; a new reference, or NULL (fallback when no exception). */
static PyObject *
scan_value(Cursor *c, int in_array)
{
    if (c->p >= c->end) {
        return NULL;
    }
    unsigned char ch = *c->p;
    if (ch == '"') {
        const unsigned char *s;
        Py_ssize_t len;
        if (scan_string(c, &s, &len) != 0) {
            return NULL;
        }
        return ascii_str(s, len);
    }
    if (in_array) {
        return NULL; /* arrays of strings only */
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        long long v;
        if (scan_int(c, &v) != 0) {
            return NULL;
        }
        return PyLong_FromLongLong(v);
    }
    if (ch == 't' && literal(c, "true", 4)) {
        return Py_NewRef(Py_True);
    }
    if (ch == 'f' && literal(c, "false", 5)) {
        return Py_NewRef(Py_False);
    }
    if (ch == 'n' && literal(c, "null", 4)) {
        return Py_NewRef(Py_None);
    }
    if (ch == '[') {
        PyObject *list = PyList_New(0);
        if (list == NULL) {
            return NULL;
        }
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == ']') {
            c->p++;
            return list;
        }
        for (;;) {
            skip_ws(c);
            PyObject *item = scan_value(c, 1);
            if (item == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            int rc = PyList_Append(list, item);
            Py_DECREF(item);
            if (rc != 0) {
                Py_DECREF(list);
                return NULL;
            }
            skip_ws(c);
            if (c->p < c->end && *c->p == ',') {
                c->p++;
                continue;
            }
            if (c->p < c->end && *c->p == ']') {
                c->p++;
                return list;
            }
            Py_DECREF(list);
            return NULL;
        }
    }
    return NULL;
}

static PyObject *
scan_flat(const unsigned char *data, Py_ssize_t n)
{
    Cursor c = {data, data + n};
    const unsigned char *names[MAX_MEMBERS];
    Py_ssize_t name_lens[MAX_MEMBERS];
    int members = 0;
    PyObject *dict;

    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') {
        return NULL;
    }
    c.p++;
    dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    skip_ws(&c);
    if (c.p < c.end && *c.p == '}') {
        c.p++;
        goto close;
    }
    for (;;) {
        const unsigned char *name;
        Py_ssize_t name_len;
        skip_ws(&c);
        if (members == MAX_MEMBERS || scan_string(&c, &name, &name_len) != 0) {
            goto fallback;
        }
        for (int i = 0; i < members; i++) {
            if (name_lens[i] == name_len && memcmp(names[i], name, (size_t)name_len) == 0) {
                goto fallback; /* duplicate member name */
            }
        }
        names[members] = name;
        name_lens[members] = name_len;
        members++;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':') {
            goto fallback;
        }
        c.p++;
        skip_ws(&c);
        PyObject *value = scan_value(&c, 0);
        if (value == NULL) {
            goto fallback;
        }
        PyObject *key = ascii_str(name, name_len);
        if (key == NULL) {
            Py_DECREF(value);
            goto fallback;
        }
        int rc = PyDict_SetItem(dict, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc != 0) {
            goto fallback;
        }
        skip_ws(&c);
        if (c.p < c.end && *c.p == ',') {
            c.p++;
            continue;
        }
        if (c.p < c.end && *c.p == '}') {
            c.p++;
            break;
        }
        goto fallback;
    }
close:
    skip_ws(&c);
    if (c.p != c.end) {
        goto fallback;
    }
    return dict;
fallback:
    Py_DECREF(dict);
    return NULL;
}

static PyObject *
scan_claims_py(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "bytes expected");
        return NULL;
    }
    PyObject *d = scan_flat((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
    if (d == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return d;
}


/* --- claims check -----------------------------------------------------------
 *
 * core.claims.check_claims with the default required claims, for the dicts
 * the scanner builds (it works on any dict). Returns the index of the reason
 * in CLAIM_REASONS below, or -1 "undecided" (the caller then runs the Python
 * function) when now/leeway are not numbers this code compares exactly as
 * Python does.
 *   0 None  1 MISSING_CLAIM  2 INVALID_CLAIM  3 EXPIRED  4 NOT_YET_VALID
 *   5 ISSUED_IN_FUTURE  6 AUDIENCE_MISMATCH
 */

#define MAX_NUMERIC_DATE 253402300799LL
#define EXACT_BOUND 4503599627370496.0 /* 2**52: int <-> double exact, sums too */

static PyObject *k_iss, *k_sub, *k_aud, *k_exp, *k_nbf, *k_iat, *k_jti;

static int
valid_time(PyObject *v, long long *out)
{
    int overflow = 0;
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || x < 0 || x > MAX_NUMERIC_DATE) {
        PyErr_Clear();
        return 0;
    }
    *out = x;
    return 1;
}

static int
valid_string(PyObject *v)
{
    return PyUnicode_CheckExact(v) && PyUnicode_GET_LENGTH(v) > 0;
}

/* A Python float, or an int within 2**52, as a double (exactly); 0 for
 * anything else (bool included). */
static int
exact_double(PyObject *v, double *out)
{
    if (PyFloat_CheckExact(v)) {
        *out = PyFloat_AS_DOUBLE(v);
        return 1;
    }
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        double dx = (double)x;
        if (dx > EXACT_BOUND || dx < -EXACT_BOUND) {
            return 0;
        }
        *out = dx;
        return 1;
    }
    return 0;
}

static int
get_member(PyObject *d, PyObject *key, PyObject **out)
{
    *out = PyDict_GetItemWithError(d, key); /* borrowed */
    if (*out == NULL && PyErr_Occurred()) {
        return -1;
    }
    return 0;
}

static PyObject *
check_claims_py(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *d, *now_o, *leeway_o, *audience;
    PyObject *iss, *sub, *aud, *exp, *nbf, *iat, *jti;
    long long exp_v = 0, nbf_v = 0, iat_v = 0;
    double now, leeway;
    int reason = 0;

    if (!PyArg_ParseTuple(args, "O!OOO:check_claims", &PyDict_Type, &d, &now_o, &leeway_o,
                          &audience)) {
        return NULL;
    }
    if (!exact_double(now_o, &now) || !exact_double(leeway_o, &leeway) ||
        (audience != Py_None && !PyUnicode_CheckExact(audience))) {
        return PyLong_FromLong(-1);
    }
    if (get_member(d, k_iss, &iss) || get_member(d, k_sub, &sub) || get_member(d, k_aud, &aud) ||
        get_member(d, k_exp, &exp) || get_member(d, k_nbf, &nbf) || get_member(d, k_iat, &iat) ||
        get_member(d, k_jti, &jti)) {
        return NULL;
    }
    /* required: iss, sub, exp, iat, jti */
    if (!iss || !sub || !exp || !iat || !jti) {
        reason = 1;
        goto out;
    }
    if ((exp && !valid_time(exp, &exp_v)) || (nbf && !valid_time(nbf, &nbf_v)) ||
        (iat && !valid_time(iat, &iat_v))) {
        reason = 2;
        goto out;
    }
    if ((iss && !valid_string(iss)) || (sub && !valid_string(sub)) ||
        (jti && !valid_string(jti))) {
        reason = 2;
        goto out;
    }
    if (aud && !valid_string(aud)) {
        if (!PyList_CheckExact(aud) || PyList_GET_SIZE(aud) == 0) {
            reason = 2;
            goto out;
        }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(aud); i++) {
            if (!valid_string(PyList_GET_ITEM(aud, i))) {
                reason = 2;
                goto out;
            }
        }
    }
    /* Python: exp <= now - leeway, nbf > now + leeway, iat > now + leeway;
     * ints here are exact doubles, and now -/+ leeway is computed as Python
     * does (float arithmetic, or exact for ints within 2**52). */
    if (exp && (double)exp_v <= now - leeway) {
        reason = 3;
        goto out;
    }
    if (nbf && (double)nbf_v > now + leeway) {
        reason = 4;
        goto out;
    }
    if (iat && (double)iat_v > now + leeway) {
        reason = 5;
        goto out;
    }
    if (audience == Py_None) {
        goto out;
    }
    if (PyUnicode_GET_LENGTH(audience) == 0) {
        reason = aud ? 6 : 0;
        goto out;
    }
    if (aud == NULL) {
        reason = 6;
        goto out;
    }
    if (PyUnicode_CheckExact(aud)) {
        int eq = PyUnicode_Compare(aud, audience);
        if (eq == -1 && PyErr_Occurred()) {
            return NULL;
        }
        reason = eq == 0 ? 0 : 6;
        goto out;
    }
    reason = 6;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(aud); i++) {
        int eq = PyUnicode_Compare(PyList_GET_ITEM(aud, i), audience);
        if (eq == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (eq == 0) {
            reason = 0;
            break;
        }
    }
out:
    return PyLong_FromLong(reason);
}

PyDoc_STRVAR(verify_doc,
"verify(tokens, start=0, stop=len(tokens)) -> (statuses, payloads, claims)\n\n"
"Check tokens[start:stop]. statuses (bytes): 0 (fallback: verify in Python),\n"
"1 + slot (signature valid) or 0x80 | (1 + slot) (signature invalid);\n"
"payloads[i]: the decoded payload bytes, or None for a fallback;\n"
"claims[i]: the payload as json.loads builds it when it is a flat object the\n"
"scanner fully understands (signature-valid tokens only), else None.");

/* One run of tokens[start:start+n]: the str objects held, their bytes, and
 * the scratch memory of phases one and two. */
typedef struct {
    Py_ssize_t n;
    PyObject **held;
    const unsigned char **data;
    Py_ssize_t *lens, *offsets, *plens, *slots;
    unsigned char *status, *scratch, *digests, **sigs;
    CallState *cs;
} Run;

static void
run_free(Run *r)
{
    if (r->held != NULL) {
        for (Py_ssize_t i = 0; i < r->n; i++) {
            Py_XDECREF(r->held[i]);
        }
    }
    if (r->cs != NULL) {
        for (Py_ssize_t i = 0; i < MAX_SLOTS; i++) {
            EVP_PKEY_CTX_free(r->cs->ctx[i]);
        }
        EVP_MD_CTX_free(r->cs->md);
    }
    PyMem_Free(r->cs);
    PyMem_Free(r->scratch);
    PyMem_Free(r->status);
    PyMem_Free(r->slots);
    PyMem_Free(r->sigs);
    PyMem_Free(r->digests);
    PyMem_Free(r->plens);
    PyMem_Free(r->offsets);
    PyMem_Free(r->lens);
    PyMem_Free(r->data);
    PyMem_Free(r->held);
    memset(r, 0, sizeof(*r));
}

/* Set up a run over seq[start:start+n] (GIL held). -1 with MemoryError. */
static int
run_init(Run *r, const KeyTable *t, PyObject *seq, Py_ssize_t start, Py_ssize_t n)
{
    size_t alloc = (size_t)(n > 0 ? n : 1), scratch_size = 0;
    memset(r, 0, sizeof(*r));
    r->n = n;
    r->held = PyMem_Calloc(alloc, sizeof(PyObject *));
    r->data = PyMem_Calloc(alloc, sizeof(unsigned char *));
    r->lens = PyMem_Calloc(alloc, sizeof(Py_ssize_t));
    r->offsets = PyMem_Calloc(alloc, sizeof(Py_ssize_t));
    r->plens = PyMem_Calloc(alloc, sizeof(Py_ssize_t));
    r->status = PyMem_Calloc(alloc, 1);
    r->slots = PyMem_Calloc(alloc, sizeof(Py_ssize_t));
    r->sigs = PyMem_Calloc(alloc, sizeof(unsigned char *));
    r->digests = PyMem_Calloc(alloc, 32);
    r->cs = PyMem_Calloc(1, sizeof(CallState));
    if (!r->held || !r->data || !r->lens || !r->offsets || !r->plens || !r->status ||
        !r->slots || !r->sigs || !r->digests || !r->cs) {
        PyErr_NoMemory();
        return -1;
    }
    /* Hold a reference to every str whose bytes we read without the GIL:
     * the caller's list may change meanwhile, the str objects cannot. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, start + i);
        r->offsets[i] = (Py_ssize_t)scratch_size;
        if (!PyUnicode_CheckExact(item)) {
            continue;
        }
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(item) != 0) {
            PyErr_Clear();
            continue;
        }
#endif
        if (!PyUnicode_IS_COMPACT_ASCII(item)) {
            continue;
        }
        Py_ssize_t len = PyUnicode_GET_LENGTH(item);
        if (len <= 0 || len > t->max_token) {
            continue;
        }
        Py_INCREF(item);
        r->held[i] = item;
        r->data[i] = (const unsigned char *)PyUnicode_DATA(item);
        r->lens[i] = len;
        /* Payload and signature each decode to at most 3/4 of the token's
         * length: room for both, the signature first. */
        scratch_size += 2 * (size_t)len;
    }
    r->scratch = PyMem_Malloc(scratch_size > 0 ? scratch_size : 1);
    r->cs->md = EVP_MD_CTX_new();
    if (r->scratch == NULL || r->cs->md == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Phase one of a run, no GIL. */
static void
run_prepare(const KeyTable *t, Run *r)
{
    for (Py_ssize_t i = 0; i < r->n; i++) {
        r->sigs[i] = r->scratch + r->offsets[i];
        r->slots[i] = r->data[i] == NULL
                          ? -1
                          : prepare_one(t, r->cs->md, r->data[i], r->lens[i], r->sigs[i],
                                        r->sigs[i] + r->lens[i], &r->plens[i],
                                        r->digests + 32 * i);
    }
}

/* Phases one and two of a run, no GIL. -1 when out of memory. */
static int
run_verify(const KeyTable *t, Run *r)
{
    run_prepare(t, r);
    return verify_prepared(t, r->cs, r->n, r->slots, r->sigs, r->digests, r->status);
}

static inline const unsigned char *
run_payload(const Run *r, Py_ssize_t i)
{
    return r->scratch + r->offsets[i] + r->lens[i];
}

/* start/stop of tokens[start:stop] clamped as slicing does; the count. */
static Py_ssize_t
clamp_run(Py_ssize_t total, Py_ssize_t *start, Py_ssize_t stop)
{
    if (*start < 0 || *start > total) {
        *start = *start < 0 ? 0 : total;
    }
    if (stop > total) {
        stop = total;
    }
    return stop > *start ? stop - *start : 0;
}

static PyObject *
KeyTable_verify(KeyTable *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "start", "stop", NULL};
    PyObject *tokens, *seq, *result = NULL, *statuses = NULL, *payloads = NULL, *claims = NULL;
    Py_ssize_t start = 0, stop = PY_SSIZE_T_MAX, n, i;
    Run r;
    int failed = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|nn:verify", kwlist, &tokens, &start,
                                     &stop)) {
        return NULL;
    }
    seq = PySequence_Fast(tokens, "tokens must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    n = clamp_run(PySequence_Fast_GET_SIZE(seq), &start, stop);
    if (run_init(&r, self, seq, start, n) != 0) {
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    failed = run_verify(self, &r) < 0;
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }

    statuses = PyBytes_FromStringAndSize((const char *)r.status, n);
    payloads = PyList_New(n);
    claims = PyList_New(n);
    if (statuses == NULL || payloads == NULL || claims == NULL) {
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *p, *d = NULL;
        if (r.status[i] == ST_FALLBACK) {
            p = Py_NewRef(Py_None);
        }
        else {
            const unsigned char *pl = run_payload(&r, i);
            p = PyBytes_FromStringAndSize((const char *)pl, r.plens[i]);
            if (p == NULL) {
                goto done;
            }
            if (!(r.status[i] & ST_INVALID)) {
                d = scan_flat(pl, r.plens[i]);
                if (d == NULL && PyErr_Occurred()) {
                    Py_DECREF(p);
                    goto done;
                }
            }
        }
        PyList_SET_ITEM(payloads, i, p);
        PyList_SET_ITEM(claims, i, d != NULL ? d : Py_NewRef(Py_None));
    }
    result = PyTuple_Pack(3, statuses, payloads, claims);

done:
    Py_XDECREF(statuses);
    Py_XDECREF(payloads);
    Py_XDECREF(claims);
    run_free(&r);
    Py_DECREF(seq);
    return result;
}

#include "sigcache.h"
#include "pipeline.h"

static PyObject *
KeyTable_len(KeyTable *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->count);
}

static PyObject *
KeyTable_mb_slots(KeyTable *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(self->mb != NULL ? self->mb_slots : 0);
}

static PyMethodDef KeyTable_methods[] = {
    {"verify", (PyCFunction)(void (*)(void))KeyTable_verify, METH_VARARGS | METH_KEYWORDS,
     verify_doc},
    {"pipeline", (PyCFunction)KeyTable_pipeline, METH_VARARGS, pipeline_doc},
    {"slots", (PyCFunction)KeyTable_len, METH_NOARGS, "Number of key slots."},
    {"multibuffer_slots", (PyCFunction)KeyTable_mb_slots, METH_NOARGS,
     "Number of key slots whose signatures go through crypto_mb."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(KeyTable_doc,
"KeyTable(entries, max_token_size, multibuffer=True)\n\n"
"entries: sequence of (header_segment: bytes, rsa_spki_der: bytes); the index\n"
"of an entry is its slot. multibuffer: verify the signatures of keys crypto_mb\n"
"takes through fedtoken._mbrsa's multi-buffer core when it runs on this CPU\n"
"(False: OpenSSL only). Immutable; safe to use from several threads.");

static PyTypeObject KeyTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fedtoken._native.KeyTable",
    .tp_basicsize = sizeof(KeyTable),
    .tp_itemsize = 0,
    .tp_dealloc = (destructor)KeyTable_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = KeyTable_doc,
    .tp_methods = KeyTable_methods,
    .tp_new = KeyTable_new,
};

static PyObject *
b64url_decode_py(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    PyObject *out;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0) {
        return NULL;
    }
    Py_ssize_t n = b64_decoded_len(view.len);
    if (n < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "not unpadded base64url");
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (b64_decode(view.buf, view.len, (unsigned char *)PyBytes_AS_STRING(out)) != 0) {
        PyBuffer_Release(&view);
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "not unpadded base64url");
        return NULL;
    }
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"check_claims", check_claims_py, METH_VARARGS,
     "check_claims(payload, now, leeway, audience) -> reason index, or -1 (undecided)."},
    {"scan_claims", scan_claims_py, METH_O,
     "The flat-object claims scanner (for tests): a dict, or None to fall back."},
    {"b64url_decode", b64url_decode_py, METH_O,
     "Strict unpadded base64url decode (the decoder of the fast path; for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fedtoken._native",
    .m_doc = "Native fast path of fedtoken's verification engine (optional).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    PyObject *m;
    init_b64();
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            ERR_clear_error();
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA256");
            return NULL;
        }
    }
    if (k_iss == NULL) {
        k_iss = PyUnicode_InternFromString("iss");
        k_sub = PyUnicode_InternFromString("sub");
        k_aud = PyUnicode_InternFromString("aud");
        k_exp = PyUnicode_InternFromString("exp");
        k_nbf = PyUnicode_InternFromString("nbf");
        k_iat = PyUnicode_InternFromString("iat");
        k_jti = PyUnicode_InternFromString("jti");
        if (!k_iss || !k_sub || !k_aud || !k_exp || !k_nbf || !k_iat || !k_jti) {
            return NULL;
        }
    }
    if (PyType_Ready(&KeyTableType) < 0 || PyType_Ready(&SignatureCacheType) < 0) {
        return NULL;
    }
    m = PyModule_Create(&native_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&KeyTableType);
    if (PyModule_AddObject(m, "KeyTable", (PyObject *)&KeyTableType) < 0) {
        Py_DECREF(&KeyTableType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&SignatureCacheType);
    if (PyModule_AddObject(m, "SignatureCache", (PyObject *)&SignatureCacheType) < 0) {
        Py_DECREF(&SignatureCacheType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "OPENSSL_VERSION", OpenSSL_version(OPENSSL_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
