/* fedtoken._native: SignatureCache, the pipeline's verified-token cache
 * (included by fastverify.c).
 *
 * What it remembers: "the token whose bytes hash to this SHA-256 carried a
 * signature that verified under the key with this fingerprint" (the first 8
 * bytes of SHA-256 of the key's DER, KeyTable.key_fps). Nothing else: a hit
 * lets the pipeline skip only the RSA operation; the header is still looked
 * up, the payload decoded, the claims, the plan (which says the resolver
 * still selects that key) and revocation checked on every call. Only valid
 * signatures are ever stored.
 *
 * Bounded: a set-associative table of 2**k sets of CACHE_WAYS entries (40
 * bytes each), replaced round robin within a set; never allocates after it
 * is made. Thread-safe: one mutex, taken once per run for its lookups and
 * once for its inserts, never with the GIL released while Python objects
 * are touched (none are).
 */

#include <pthread.h>

#define CACHE_WAYS 4

typedef struct {
    unsigned char digest[32];
    uint64_t key_fp; /* 0: empty */
} CacheEntry;

typedef struct {
    PyObject_HEAD
    uint64_t sets; /* a power of two */
    CacheEntry *entries;
    uint8_t *next_way;
    pthread_mutex_t lock;
    unsigned long long hits, misses, stores;
} SignatureCache;

static void
SignatureCache_dealloc(SignatureCache *self)
{
    PyMem_Free(self->entries);
    PyMem_Free(self->next_way);
    pthread_mutex_destroy(&self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
SignatureCache_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"size", NULL};
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:SignatureCache", kwlist, &size)) {
        return NULL;
    }
    if (size < 1 || size > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "size must be between 1 and 2**24");
        return NULL;
    }
    uint64_t sets = 1;
    while (sets * CACHE_WAYS < (uint64_t)size) {
        sets <<= 1;
    }
    SignatureCache *self = (SignatureCache *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->sets = sets;
    self->entries = PyMem_Calloc((size_t)(sets * CACHE_WAYS), sizeof(CacheEntry));
    self->next_way = PyMem_Calloc((size_t)sets, 1);
    if (self->entries == NULL || self->next_way == NULL ||
        pthread_mutex_init(&self->lock, NULL) != 0) {
        PyMem_Free(self->entries);
        PyMem_Free(self->next_way);
        self->entries = NULL;
        self->next_way = NULL;
        Py_TYPE(self)->tp_free((PyObject *)self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static uint64_t
cache_set(const SignatureCache *c, const unsigned char *digest)
{
    uint64_t v;
    memcpy(&v, digest, sizeof(v));
    return v & (c->sets - 1);
}

/* Lock held. */
static int
cache_lookup(SignatureCache *c, const unsigned char *digest, uint64_t key_fp)
{
    const CacheEntry *e = c->entries + cache_set(c, digest) * CACHE_WAYS;
    for (int w = 0; w < CACHE_WAYS; w++) {
        if (e[w].key_fp == key_fp && memcmp(e[w].digest, digest, 32) == 0) {
            c->hits++;
            return 1;
        }
    }
    c->misses++;
    return 0;
}

/* Lock held. */
static void
cache_store(SignatureCache *c, const unsigned char *digest, uint64_t key_fp)
{
    uint64_t set = cache_set(c, digest);
    CacheEntry *e = c->entries + set * CACHE_WAYS;
    for (int w = 0; w < CACHE_WAYS; w++) {
        if (e[w].key_fp == key_fp && memcmp(e[w].digest, digest, 32) == 0) {
            return;
        }
    }
    uint8_t w = c->next_way[set];
    c->next_way[set] = (uint8_t)((w + 1) % CACHE_WAYS);
    memcpy(e[w].digest, digest, 32);
    e[w].key_fp = key_fp;
    c->stores++;
}

static PyObject *
SignatureCache_clear(SignatureCache *self, PyObject *Py_UNUSED(ignored))
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    memset(self->entries, 0, (size_t)(self->sets * CACHE_WAYS) * sizeof(CacheEntry));
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
SignatureCache_stats(SignatureCache *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long hits, misses, stores;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    hits = self->hits;
    misses = self->misses;
    stores = self->stores;
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{sKsKsKsK}", "capacity",
                         (unsigned long long)(self->sets * CACHE_WAYS), "hits", hits,
                         "misses", misses, "stores", stores);
}

static PyMethodDef SignatureCache_methods[] = {
    {"clear", (PyCFunction)SignatureCache_clear, METH_NOARGS, "Forget every entry."},
    {"stats", (PyCFunction)SignatureCache_stats, METH_NOARGS,
     "{capacity, hits, misses, stores} since it was made."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SignatureCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fedtoken._native.SignatureCache",
    .tp_basicsize = sizeof(SignatureCache),
    .tp_itemsize = 0,
    .tp_dealloc = (destructor)SignatureCache_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SignatureCache(size): the pipeline's verified-token cache (see sigcache.h);\n"
              "capacity is size rounded up to a power of two times 4, 40 bytes an entry.",
    .tp_methods = SignatureCache_methods,
    .tp_new = SignatureCache_new,
};
