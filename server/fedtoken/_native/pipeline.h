/* fedtoken._native: the batch pipeline (included by fastverify.c).
 *
 * KeyTable.pipeline decides a run of tokens end to end: with the GIL released
 * it splits, decodes, hashes and verifies them (phases one and two of
 * KeyTable.verify), scans the flat claims into spans (no Python object),
 * checks them as core.claims.check_claims does, checks the jti against the
 * revocation view's digest table, and writes each decided token's Verdict
 * as the bytes of one element of VerifyBatchResponse.verdicts. With the GIL
 * held it checks subject revocations (a dict of the view) and builds the
 * compact audit entries. Python prepares a plan per slot once per batch
 * (what the resolver answers for the slot's key and issuer under the call's
 * expectation); a slot without a plan is never decided here.
 *
 * A token is decided natively only when everything about it is known here:
 * its header is tabled, its payload has the scanner's flat shape, its iss is
 * exactly the slot key's issuer, and the plan of that slot says the resolver
 * selects that very key. Every other token is "rest": its index and the
 * byte offset where its element belongs are returned, and the Python path
 * gives its verdict. The verdicts are those of the Python path: the
 * differential tests compare them on the attack table, mutations and
 * garbage.
 */

#define CL_ABSENT 0
#define CL_STR 1
#define CL_INT 2
#define CL_OTHER 3   /* true, false, null, or an array with a non-string */
#define CL_LIST 4    /* a non-empty array of non-empty strings */
#define CL_BADLIST 5 /* an array that is empty or holds an empty string */

typedef struct {
    int type;
    const unsigned char *s; /* CL_STR: the contents (printable ASCII, no escapes) */
    Py_ssize_t len;
    long long v;            /* CL_INT */
    const unsigned char *list; /* CL_LIST: from '[' to past ']' */
    const unsigned char *list_end;
} Member;

enum { M_ISS, M_SUB, M_AUD, M_EXP, M_NBF, M_IAT, M_JTI, M_COUNT };
static const char *const member_names[M_COUNT] = {"iss", "sub", "aud", "exp", "nbf", "iat",
                                                  "jti"};

typedef struct {
    Member m[M_COUNT];
} Claims;

/* One value of the scanner's grammar (see scan_flat), recorded into *out
 * (NULL: skipped). 0, or -1: not the flat shape. */
static int
span_value(Cursor *c, Member *out)
{
    Member tmp;
    if (out == NULL) {
        out = &tmp;
    }
    if (c->p >= c->end) {
        return -1;
    }
    unsigned char ch = *c->p;
    if (ch == '"') {
        if (scan_string(c, &out->s, &out->len) != 0) {
            return -1;
        }
        out->type = CL_STR;
        return 0;
    }
    if (ch == '-' || (ch >= '0' && ch <= '9')) {
        if (scan_int(c, &out->v) != 0) {
            return -1;
        }
        out->type = CL_INT;
        return 0;
    }
    if ((ch == 't' && literal(c, "true", 4)) || (ch == 'f' && literal(c, "false", 5)) ||
        (ch == 'n' && literal(c, "null", 4))) {
        out->type = CL_OTHER;
        return 0;
    }
    if (ch == '[') {
        const unsigned char *open = c->p;
        int count = 0, empty = 0;
        c->p++;
        skip_ws(c);
        if (c->p < c->end && *c->p == ']') {
            c->p++;
            out->type = CL_BADLIST;
            return 0;
        }
        for (;;) {
            const unsigned char *s;
            Py_ssize_t len;
            skip_ws(c);
            if (scan_string(c, &s, &len) != 0) {
                return -1; /* arrays of strings only, as scan_flat */
            }
            count++;
            empty |= len == 0;
            skip_ws(c);
            if (c->p < c->end && *c->p == ',') {
                c->p++;
                continue;
            }
            if (c->p < c->end && *c->p == ']') {
                c->p++;
                break;
            }
            return -1;
        }
        out->type = empty || count == 0 ? CL_BADLIST : CL_LIST;
        out->list = open;
        out->list_end = c->p;
        return 0;
    }
    return -1;
}

/* The registered claims of a payload of exactly scan_flat's shape (same
 * grammar: it accepts what scan_flat accepts and nothing else). 0, or -1. */
static int
scan_spans(const unsigned char *data, Py_ssize_t n, Claims *cl)
{
    Cursor c = {data, data + n};
    const unsigned char *names[MAX_MEMBERS];
    Py_ssize_t name_lens[MAX_MEMBERS];
    int members = 0;

    memset(cl, 0, sizeof(*cl));
    skip_ws(&c);
    if (c.p >= c.end || *c.p != '{') {
        return -1;
    }
    c.p++;
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
            return -1;
        }
        for (int i = 0; i < members; i++) {
            if (name_lens[i] == name_len && memcmp(names[i], name, (size_t)name_len) == 0) {
                return -1; /* duplicate member name */
            }
        }
        names[members] = name;
        name_lens[members] = name_len;
        members++;
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ':') {
            return -1;
        }
        c.p++;
        skip_ws(&c);
        Member *slot = NULL;
        if (name_len == 3) {
            for (int k = 0; k < M_COUNT; k++) {
                if (memcmp(name, member_names[k], 3) == 0) {
                    slot = &cl->m[k];
                    break;
                }
            }
        }
        if (span_value(&c, slot) != 0) {
            return -1;
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
        return -1;
    }
close:
    skip_ws(&c);
    return c.p == c.end ? 0 : -1;
}

/* Reason indexes of the pipeline (the order of the `reasons` argument). */
#define RS_OK 0
#define RS_MISSING 1
#define RS_INVALID 2
#define RS_EXPIRED 3
#define RS_NOT_YET_VALID 4
#define RS_IN_FUTURE 5
#define RS_AUDIENCE 6
#define RS_REVOKED 7
#define RS_BAD_SIGNATURE 8
#define RS_COUNT 9

static int
time_ok(const Member *m)
{
    return m->type == CL_ABSENT || (m->type == CL_INT && m->v >= 0 && m->v <= MAX_NUMERIC_DATE);
}

static int
string_ok(const Member *m)
{
    return m->type == CL_ABSENT || (m->type == CL_STR && m->len > 0);
}

static int
aud_has(const Member *aud, const unsigned char *want, Py_ssize_t want_len)
{
    if (aud->type == CL_STR) {
        return aud->len == want_len && memcmp(aud->s, want, (size_t)want_len) == 0;
    }
    Cursor c = {aud->list + 1, aud->list_end};
    for (;;) {
        const unsigned char *s;
        Py_ssize_t len;
        skip_ws(&c);
        if (scan_string(&c, &s, &len) != 0) {
            return 0;
        }
        if (len == want_len && memcmp(s, want, (size_t)want_len) == 0) {
            return 1;
        }
        skip_ws(&c);
        if (c.p >= c.end || *c.p != ',') {
            return 0;
        }
        c.p++;
    }
}

/* core.claims.check_claims with the default required claims; audience NULL
 * means None (no comparison). */
static int
claims_reason(const Claims *cl, double now, double leeway, const unsigned char *audience,
              Py_ssize_t audience_len)
{
    const Member *m = cl->m;
    if (!m[M_ISS].type || !m[M_SUB].type || !m[M_EXP].type || !m[M_IAT].type ||
        !m[M_JTI].type) {
        return RS_MISSING;
    }
    if (!time_ok(&m[M_EXP]) || !time_ok(&m[M_NBF]) || !time_ok(&m[M_IAT])) {
        return RS_INVALID;
    }
    if (!string_ok(&m[M_ISS]) || !string_ok(&m[M_SUB]) || !string_ok(&m[M_JTI])) {
        return RS_INVALID;
    }
    const Member *aud = &m[M_AUD];
    if (aud->type != CL_ABSENT && !(aud->type == CL_STR && aud->len > 0) &&
        aud->type != CL_LIST) {
        return RS_INVALID;
    }
    if ((double)m[M_EXP].v <= now - leeway) {
        return RS_EXPIRED;
    }
    if (m[M_NBF].type && (double)m[M_NBF].v > now + leeway) {
        return RS_NOT_YET_VALID;
    }
    if ((double)m[M_IAT].v > now + leeway) {
        return RS_IN_FUTURE;
    }
    if (audience == NULL) {
        return RS_OK;
    }
    if (audience_len == 0) {
        return aud->type ? RS_AUDIENCE : RS_OK;
    }
    if (!aud->type) {
        return RS_AUDIENCE;
    }
    return aud_has(aud, audience, audience_len) ? RS_OK : RS_AUDIENCE;
}

/* What Python prepared for one slot. */
typedef struct {
    int on;
    const unsigned char *iss;     /* the key's issuer: a token's iss must equal it */
    Py_ssize_t iss_len;
    const unsigned char *fields;  /* Verdict fields 3-5 (tenant, issuer, kid), encoded */
    Py_ssize_t fields_len;
    const unsigned char *tenant;  /* the jti digest's prefix: len byte + tenant */
    Py_ssize_t tenant_len;
    PyObject *tenant_str;         /* borrowed: for the subject lookup */
    PyObject *audit_kid;          /* borrowed */
    const unsigned char *ref;     /* a foreign issuer's revocation prefix ("iss\x1f"), or "" */
    Py_ssize_t ref_len;
    int foreign;                  /* Verdict.foreign */
} Plan;

#define MAX_ITEM_LEN 1024 /* audit.rows.MAX_ITEM_CHARS: longer strings go to Python */

/* The revocation view's jti table (DigestTable._Slots). */
typedef struct {
    const volatile uint64_t *digests;
    uint64_t mask;
} JtiTable;

static int
jti_revoked(const JtiTable *jt, EVP_MD_CTX *md, const Plan *plan, const Member *jti)
{
    unsigned char d[32];
    unsigned int dlen = 0;
    if (jt->digests == NULL) {
        return 0;
    }
    if (EVP_DigestInit_ex(md, sha256_md, NULL) <= 0 ||
        EVP_DigestUpdate(md, plan->tenant, (size_t)plan->tenant_len) <= 0 ||
        EVP_DigestUpdate(md, plan->ref, (size_t)plan->ref_len) <= 0 ||
        EVP_DigestUpdate(md, jti->s, (size_t)jti->len) <= 0 ||
        EVP_DigestFinal_ex(md, d, &dlen) <= 0 || dlen != 32) {
        ERR_clear_error();
        return -1;
    }
    uint64_t digest = 0;
    for (int k = 0; k < 8; k++) {
        digest = (digest << 8) | d[k];
    }
    digest >>= 1;
    uint64_t key = digest | (1ULL << 63), i = digest & jt->mask;
    for (uint64_t probes = 0; probes <= jt->mask; probes++) {
        uint64_t v = jt->digests[i];
        if (v == key) {
            return 1;
        }
        if (v == 0) {
            return 0;
        }
        i = (i + 1) & jt->mask;
    }
    return 1; /* a full table: fail closed (the view never lets it fill) */
}

/* --- protobuf writing ------------------------------------------------------ */

static size_t
varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static unsigned char *
put_varint(unsigned char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (unsigned char)v;
    return p;
}

static unsigned char *
put_bytes(unsigned char *p, unsigned field, const unsigned char *s, Py_ssize_t len)
{
    if (len == 0) {
        return p;
    }
    *p++ = (unsigned char)(field << 3 | 2);
    p = put_varint(p, (uint64_t)len);
    memcpy(p, s, (size_t)len);
    return p + len;
}

static size_t
bytes_field_len(Py_ssize_t len)
{
    return len == 0 ? 0 : 1 + varint_len((uint64_t)len) + (size_t)len;
}

/* One decided token. */
typedef struct {
    int reason;      /* R_* */
    Py_ssize_t slot;
    Claims cl;
    int need_subject; /* the subject revocation lookup is still to be made */
} Decision;

/* The Verdict message of a decision (as convert.verdict_pb serializes it:
 * fields in order, defaults omitted); returns its length, writes when out. */
static size_t
verdict_message(const Decision *d, const Plan *plan, const int *reason_pb,
                const unsigned char *payload, Py_ssize_t payload_len, unsigned char *out)
{
    const Claims *cl = &d->cl;
    int valid = d->reason == RS_OK, bad_sig = d->reason == RS_BAD_SIGNATURE;
    const Member *sub = &cl->m[M_SUB], *jti = &cl->m[M_JTI], *exp = &cl->m[M_EXP];
    Py_ssize_t sub_len = !bad_sig && sub->type == CL_STR ? sub->len : 0;
    Py_ssize_t jti_len = !bad_sig && jti->type == CL_STR ? jti->len : 0;
    /* Verdict.expires_at: exp when it is an int, sent as 0 unless it is a
     * NumericDate (convert._verdict_fields). */
    long long expires = !bad_sig && exp->type == CL_INT && exp->v >= 0 &&
                                exp->v <= MAX_NUMERIC_DATE
                            ? exp->v
                            : 0;
    Py_ssize_t claims_len = valid ? payload_len : 0;
    size_t size = (valid ? 2 : 0) + 1 + varint_len((uint64_t)reason_pb[d->reason]) +
                  (size_t)plan->fields_len + bytes_field_len(sub_len) +
                  bytes_field_len(jti_len) + (expires ? 1 + varint_len((uint64_t)expires) : 0) +
                  bytes_field_len(claims_len) + (plan->foreign ? 2 : 0);
    if (out == NULL) {
        return size;
    }
    unsigned char *p = out;
    if (valid) {
        *p++ = 1 << 3;
        *p++ = 1;
    }
    *p++ = 2 << 3;
    p = put_varint(p, (uint64_t)reason_pb[d->reason]);
    memcpy(p, plan->fields, (size_t)plan->fields_len);
    p += plan->fields_len;
    p = put_bytes(p, 6, sub->s, sub_len);
    p = put_bytes(p, 7, jti->s, jti_len);
    if (expires) {
        *p++ = 8 << 3;
        p = put_varint(p, (uint64_t)expires);
    }
    p = put_bytes(p, 9, payload, claims_len);
    if (plan->foreign) {
        *p++ = 10 << 3;
        *p++ = 1;
    }
    return (size_t)(p - out);
}

/* Phase three for one verified token, no GIL: the decision, or -1 (rest). */
static int
decide_one(const Run *r, Py_ssize_t i, const Plan *plans, const JtiTable *jt, double now,
           double leeway, const unsigned char *audience, Py_ssize_t audience_len,
           int subjects, Decision *d)
{
    uint8_t st = r->status[i];
    if (st == ST_FALLBACK) {
        return -1;
    }
    Py_ssize_t slot = (st & 0x7F) - 1;
    const Plan *plan = &plans[slot];
    if (!plan->on || scan_spans(run_payload(r, i), r->plens[i], &d->cl) != 0) {
        return -1;
    }
    const Member *iss = &d->cl.m[M_ISS];
    if (iss->type != CL_STR || iss->len != plan->iss_len ||
        memcmp(iss->s, plan->iss, (size_t)plan->iss_len) != 0) {
        return -1; /* another issuer's keys decide: Python resolves it */
    }
    const Member *sub = &d->cl.m[M_SUB], *jti = &d->cl.m[M_JTI];
    if ((sub->type == CL_STR && sub->len > MAX_ITEM_LEN) ||
        (jti->type == CL_STR && jti->len > MAX_ITEM_LEN)) {
        return -1; /* the audit shortens these: Python writes the entry */
    }
    d->slot = slot;
    d->need_subject = 0;
    if (st & ST_INVALID) {
        d->reason = RS_BAD_SIGNATURE;
        return 0;
    }
    d->reason = claims_reason(&d->cl, now, leeway, audience, audience_len);
    if (d->reason == RS_OK) {
        int revoked = jti_revoked(jt, r->cs->md, plan, jti);
        if (revoked < 0) {
            return -1;
        }
        if (revoked) {
            d->reason = RS_REVOKED;
        }
        else if (subjects) {
            d->need_subject = 1;
        }
    }
    return 0;
}

/* The subject revocation check of the view (GIL held): (tenant, subject) ->
 * (issued_before, ...); a token issued before the cut is revoked.
 * 1 revoked, 0 not, -1 error. */
static int
subject_revoked(PyObject *subjects, const Plan *plan, const Claims *cl)
{
    const Member *sub = &cl->m[M_SUB];
    /* The subject as the view keys it: a foreign issuer's is "iss\x1fsub". */
    unsigned char *buf = PyMem_Malloc((size_t)(plan->ref_len + sub->len) + 1);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(buf, plan->ref, (size_t)plan->ref_len);
    memcpy(buf + plan->ref_len, sub->s, (size_t)sub->len);
    PyObject *s = PyUnicode_DecodeUTF8((const char *)buf, plan->ref_len + sub->len, "strict");
    PyMem_Free(buf);
    if (s == NULL) {
        return -1;
    }
    PyObject *key = PyTuple_Pack(2, plan->tenant_str, s);
    Py_DECREF(s);
    if (key == NULL) {
        return -1;
    }
    PyObject *cut = PyDict_GetItemWithError(subjects, key);
    Py_DECREF(key);
    if (cut == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_Check(cut) || PyTuple_GET_SIZE(cut) < 1) {
        return 1; /* not what the view stores: fail closed */
    }
    PyObject *iat = PyLong_FromLongLong(cl->m[M_IAT].v);
    if (iat == NULL) {
        return -1;
    }
    int lt = PyObject_RichCompareBool(iat, PyTuple_GET_ITEM(cut, 0), Py_LT);
    Py_DECREF(iat);
    return lt;
}

static int
parse_plans(PyObject *plan_seq, const KeyTable *t, Plan *plans)
{
    if (!PyTuple_Check(plan_seq) || PyTuple_GET_SIZE(plan_seq) != t->count) {
        PyErr_SetString(PyExc_ValueError, "plan must be a tuple with one item per slot");
        return -1;
    }
    for (Py_ssize_t k = 0; k < t->count; k++) {
        PyObject *p = PyTuple_GET_ITEM(plan_seq, k);
        memset(&plans[k], 0, sizeof(Plan));
        if (p == Py_None) {
            continue;
        }
        if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 7 ||
            !PyBytes_Check(PyTuple_GET_ITEM(p, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(p, 1)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(p, 2)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(p, 3)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(p, 4)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(p, 5)) || !PyBool_Check(PyTuple_GET_ITEM(p, 6))) {
            PyErr_SetString(PyExc_TypeError,
                            "a slot plan is (iss: bytes, fields: bytes, digest_prefix: bytes, "
                            "tenant: str, audit_kid: str, ref: bytes, foreign: bool) or None");
            return -1;
        }
        Plan *pl = &plans[k];
        pl->on = 1;
        pl->iss = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 0));
        pl->iss_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 0));
        pl->fields = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 1));
        pl->fields_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 1));
        pl->tenant = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 2));
        pl->tenant_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 2));
        pl->tenant_str = PyTuple_GET_ITEM(p, 3);
        pl->audit_kid = PyTuple_GET_ITEM(p, 4);
        pl->ref = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(p, 5));
        pl->ref_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(p, 5));
        pl->foreign = PyTuple_GET_ITEM(p, 6) == Py_True;
    }
    return 0;
}

/* The audit entry of a decision: [jti, sub, kid, outcome, reason, request_id, at]
 * (audit.rows.VERIFIED_FIELDS). */
static PyObject *
audit_entry(const Decision *d, const Plan *plan, PyObject *const *reason_names,
            PyObject *valid_s, PyObject *invalid_s, PyObject *request_id, PyObject *at)
{
    const Member *sub = &d->cl.m[M_SUB], *jti = &d->cl.m[M_JTI];
    int bad_sig = d->reason == RS_BAD_SIGNATURE;
    PyObject *j = ascii_str(jti->s, !bad_sig && jti->type == CL_STR ? jti->len : 0);
    PyObject *s = ascii_str(sub->s, !bad_sig && sub->type == CL_STR ? sub->len : 0);
    PyObject *e = NULL;
    if (j != NULL && s != NULL) {
        e = PyList_New(7);
    }
    if (e == NULL) {
        Py_XDECREF(j);
        Py_XDECREF(s);
        return NULL;
    }
    PyList_SET_ITEM(e, 0, j);
    PyList_SET_ITEM(e, 1, s);
    PyList_SET_ITEM(e, 2, Py_NewRef(plan->audit_kid));
    PyList_SET_ITEM(e, 3, Py_NewRef(d->reason == RS_OK ? valid_s : invalid_s));
    PyList_SET_ITEM(e, 4, Py_NewRef(reason_names[d->reason]));
    PyList_SET_ITEM(e, 5, Py_NewRef(request_id));
    PyList_SET_ITEM(e, 6, Py_NewRef(at));
    return e;
}

/* The cache lookups of a prepared run, no GIL: a token whose exact bytes
 * verified under its slot's key before gets hit[i] = 1 + slot and is taken
 * out of the signature phase (slot -1); the others get their digest noted. */
static void
cache_lookups(const KeyTable *t, Run *r, SignatureCache *cache, unsigned char *token_digests,
              uint8_t *hit)
{
    for (Py_ssize_t i = 0; i < r->n; i++) {
        hit[i] = 0;
        if (r->slots[i] >= 0 &&
            EVP_Digest(r->data[i], (size_t)r->lens[i], token_digests + 32 * i, NULL, sha256_md,
                       NULL) != 1) {
            ERR_clear_error();
            r->slots[i] = -1; /* the Python path decides */
        }
    }
    pthread_mutex_lock(&cache->lock);
    for (Py_ssize_t i = 0; i < r->n; i++) {
        Py_ssize_t slot = r->slots[i];
        if (slot >= 0 && cache_lookup(cache, token_digests + 32 * i, t->key_fps[slot])) {
            hit[i] = (uint8_t)(1 + slot);
            r->slots[i] = -1;
        }
    }
    pthread_mutex_unlock(&cache->lock);
}

/* After the signature phase, no GIL: hits get their valid status back, and
 * every signature that verified is stored. */
static void
cache_results(const KeyTable *t, Run *r, SignatureCache *cache,
              const unsigned char *token_digests, const uint8_t *hit)
{
    pthread_mutex_lock(&cache->lock);
    for (Py_ssize_t i = 0; i < r->n; i++) {
        if (hit[i]) {
            r->slots[i] = hit[i] - 1;
            r->status[i] = hit[i];
        }
        else if (r->status[i] != ST_FALLBACK && !(r->status[i] & ST_INVALID)) {
            cache_store(cache, token_digests + 32 * i, t->key_fps[(r->status[i] & 0x7F) - 1]);
        }
    }
    pthread_mutex_unlock(&cache->lock);
}

PyDoc_STRVAR(pipeline_doc,
"pipeline(tokens, start, stop, plan, audience, now, leeway, jtis, subjects,\n"
"         reasons, request_id, at, cache) -> (out, rest, cuts, audit)\n\n"
"Decide tokens[start:stop] end to end (see pipeline.h). plan: one item per\n"
"slot, None or (iss, fields, digest_prefix, tenant, audit_kid, ref, foreign).\n"
"audience:\n"
"bytes, or None for no comparison. jtis: the view's digest array ('Q', a\n"
"power of two long) or None. subjects: the view's subject dict or None.\n"
"reasons: RS_COUNT (pb_value, name) pairs. out: the VerifyBatchResponse\n"
"elements of the decided tokens in order; rest: indexes (into tokens) of\n"
"the others, cuts: where each one's element belongs in out; audit: per\n"
"slot, the list of audit entries of its decided tokens, or None.");

static PyObject *
KeyTable_pipeline(KeyTable *self, PyObject *args)
{
    PyObject *tokens, *plan_seq, *audience_o, *now_o, *leeway_o, *jtis_o, *subjects, *reasons;
    PyObject *request_id, *at, *cache_o, *seq = NULL, *result = NULL, *out = NULL, *rest = NULL;
    PyObject *cuts = NULL, *audit = NULL, *valid_s = NULL, *invalid_s = NULL;
    Py_ssize_t start, stop, n = 0, i;
    Plan plans[MAX_SLOTS];
    PyObject *reason_names[RS_COUNT];
    int reason_pb[RS_COUNT];
    double now, leeway;
    const unsigned char *audience = NULL;
    Py_ssize_t audience_len = 0;
    Py_buffer jbuf = {0};
    JtiTable jt = {NULL, 0};
    Run r;
    Decision *dec = NULL;
    int *decided = NULL, failed = 0;
    size_t total = 0;
    SignatureCache *cache = NULL;
    unsigned char *token_digests = NULL;
    uint8_t *hit = NULL;

    memset(&r, 0, sizeof(r));
    if (!PyArg_ParseTuple(args, "OnnO!OOOOOO!UOO:pipeline", &tokens, &start, &stop,
                          &PyTuple_Type, &plan_seq, &audience_o, &now_o, &leeway_o, &jtis_o,
                          &subjects, &PyTuple_Type, &reasons, &request_id, &at, &cache_o)) {
        return NULL;
    }
    if (cache_o != Py_None) {
        if (!PyObject_TypeCheck(cache_o, &SignatureCacheType)) {
            PyErr_SetString(PyExc_TypeError, "cache must be a SignatureCache or None");
            return NULL;
        }
        cache = (SignatureCache *)cache_o;
    }
    if (!exact_double(now_o, &now) || !exact_double(leeway_o, &leeway)) {
        PyErr_SetString(PyExc_ValueError, "now and leeway must be exact numbers");
        return NULL;
    }
    if (audience_o != Py_None) {
        if (!PyBytes_Check(audience_o)) {
            PyErr_SetString(PyExc_TypeError, "audience must be bytes or None");
            return NULL;
        }
        audience = (const unsigned char *)PyBytes_AS_STRING(audience_o);
        audience_len = PyBytes_GET_SIZE(audience_o);
    }
    if (subjects != Py_None && !PyDict_CheckExact(subjects)) {
        PyErr_SetString(PyExc_TypeError, "subjects must be a dict or None");
        return NULL;
    }
    if (PyTuple_GET_SIZE(reasons) != RS_COUNT) {
        PyErr_SetString(PyExc_ValueError, "reasons must have one (pb, name) per reason");
        return NULL;
    }
    for (int k = 0; k < RS_COUNT; k++) {
        PyObject *item = PyTuple_GET_ITEM(reasons, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyLong_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyUnicode_CheckExact(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "reasons must be (int, str) pairs");
            return NULL;
        }
        long v = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (v < 1 || v > 1000) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "reason value out of range");
            }
            return NULL;
        }
        reason_pb[k] = (int)v;
        reason_names[k] = PyTuple_GET_ITEM(item, 1);
    }
    if (parse_plans(plan_seq, self, plans) != 0) {
        return NULL;
    }
    if (jtis_o != Py_None) {
        if (PyObject_GetBuffer(jtis_o, &jbuf, PyBUF_SIMPLE | PyBUF_FORMAT) != 0) {
            return NULL;
        }
        Py_ssize_t count = jbuf.len / 8;
        if (jbuf.itemsize != 8 || jbuf.format == NULL || strcmp(jbuf.format, "Q") != 0 ||
            count <= 0 || (count & (count - 1)) != 0) {
            PyErr_SetString(PyExc_ValueError, "jtis must be an array('Q') of 2**k items");
            goto done;
        }
        jt.digests = (const volatile uint64_t *)jbuf.buf;
        jt.mask = (uint64_t)count - 1;
    }
    seq = PySequence_Fast(tokens, "tokens must be a sequence");
    if (seq == NULL) {
        goto done;
    }
    n = clamp_run(PySequence_Fast_GET_SIZE(seq), &start, stop);
    if (run_init(&r, self, seq, start, n) != 0) {
        goto done;
    }
    dec = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(Decision));
    decided = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(int));
    if (cache != NULL) {
        token_digests = PyMem_Malloc((size_t)(n > 0 ? n : 1) * 32);
        hit = PyMem_Calloc((size_t)(n > 0 ? n : 1), 1);
    }
    if (dec == NULL || decided == NULL || (cache != NULL && (!token_digests || !hit))) {
        PyErr_NoMemory();
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    run_prepare(self, &r);
    if (cache != NULL) {
        cache_lookups(self, &r, cache, token_digests, hit);
    }
    failed = verify_prepared(self, r.cs, r.n, r.slots, r.sigs, r.digests, r.status) < 0;
    if (!failed && cache != NULL) {
        cache_results(self, &r, cache, token_digests, hit);
    }
    if (!failed) {
        for (i = 0; i < n; i++) {
            decided[i] = decide_one(&r, i, plans, &jt, now, leeway, audience, audience_len,
                                    subjects != Py_None, &dec[i]) == 0;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    if (subjects != Py_None) {
        for (i = 0; i < n; i++) {
            if (decided[i] && dec[i].need_subject) {
                int revoked = subject_revoked(subjects, &plans[dec[i].slot], &dec[i].cl);
                if (revoked < 0) {
                    goto done;
                }
                if (revoked) {
                    dec[i].reason = RS_REVOKED;
                }
            }
        }
    }
    /* The elements: tag 1, length, the Verdict message. */
    for (i = 0; i < n; i++) {
        if (decided[i]) {
            size_t m = verdict_message(&dec[i], &plans[dec[i].slot], reason_pb, run_payload(&r, i),
                                       r.plens[i], NULL);
            total += 1 + varint_len(m) + m;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    rest = PyList_New(0);
    cuts = PyList_New(0);
    audit = PyList_New(self->count);
    valid_s = PyUnicode_InternFromString("valid");
    invalid_s = PyUnicode_InternFromString("invalid");
    if (out == NULL || rest == NULL || cuts == NULL || audit == NULL || valid_s == NULL ||
        invalid_s == NULL) {
        goto done;
    }
    for (Py_ssize_t k = 0; k < self->count; k++) {
        PyList_SET_ITEM(audit, k, Py_NewRef(Py_None));
    }
    unsigned char *base = (unsigned char *)PyBytes_AS_STRING(out), *p = base;
    for (i = 0; i < n; i++) {
        if (!decided[i]) {
            PyObject *idx = PyLong_FromSsize_t(start + i);
            PyObject *cut = PyLong_FromSsize_t(p - base);
            int rc = idx != NULL && cut != NULL ? PyList_Append(rest, idx) : -1;
            rc = rc == 0 ? PyList_Append(cuts, cut) : -1;
            Py_XDECREF(idx);
            Py_XDECREF(cut);
            if (rc != 0) {
                goto done;
            }
            continue;
        }
        const Plan *plan = &plans[dec[i].slot];
        size_t m = verdict_message(&dec[i], plan, reason_pb, run_payload(&r, i), r.plens[i],
                                   NULL);
        *p++ = 1 << 3 | 2;
        p = put_varint(p, m);
        p += verdict_message(&dec[i], plan, reason_pb, run_payload(&r, i), r.plens[i], p);
        PyObject *entries = PyList_GET_ITEM(audit, dec[i].slot);
        if (entries == Py_None) {
            entries = PyList_New(0);
            if (entries == NULL) {
                goto done;
            }
            PyList_SET_ITEM(audit, dec[i].slot, entries); /* steals; Py_None's ref: */
            Py_DECREF(Py_None);
        }
        PyObject *e = audit_entry(&dec[i], plan, reason_names, valid_s, invalid_s, request_id,
                                  at);
        if (e == NULL) {
            goto done;
        }
        int rc = PyList_Append(entries, e);
        Py_DECREF(e);
        if (rc != 0) {
            goto done;
        }
    }
    if ((size_t)(p - base) != total) {
        PyErr_SetString(PyExc_SystemError, "pipeline: response size mismatch");
        goto done;
    }
    result = PyTuple_Pack(4, out, rest, cuts, audit);

done:
    Py_XDECREF(out);
    Py_XDECREF(rest);
    Py_XDECREF(cuts);
    Py_XDECREF(audit);
    Py_XDECREF(valid_s);
    Py_XDECREF(invalid_s);
    PyMem_Free(dec);
    PyMem_Free(decided);
    PyMem_Free(token_digests);
    PyMem_Free(hit);
    run_free(&r);
    Py_XDECREF(seq);
    if (jbuf.obj != NULL) {
        PyBuffer_Release(&jbuf);
    }
    return result;
}
