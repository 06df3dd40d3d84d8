/*
 * MRENCLAVE's SHA-256 for the model, compiled at run time (vepc.silicon.native_measure).
 *
 * A hashlib-like SHA-256 object over OpenSSL's EVP interface -- the same libcrypto that hashlib uses,
 * the implementation the benchmark's limit runs -- plus the one thing hashlib cannot do without a
 * copy: absorb, for many pages at once, the blocks EADD and its 16 EEXTENDs feed the measurement
 * (SDM EADD: "EADD" | offset | SECINFO[0:48]; EEXTEND: "EEXTEND" | offset | 48 zero bytes, then the
 * 256 bytes of the chunk), reading each chunk where the page is, with the GIL released for the whole
 * batch. gather() copies listed source pages into one buffer, also without the GIL.
 *
 * The OpenSSL prototypes are declared here (they are libcrypto's stable ABI), so no headers are needed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>

typedef struct evp_md_ctx_st EVP_MD_CTX;
typedef struct evp_md_st EVP_MD;
typedef struct engine_st ENGINE;
extern EVP_MD_CTX *EVP_MD_CTX_new(void);
extern void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
extern const EVP_MD *EVP_sha256(void);
extern int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, ENGINE *impl);
extern int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
extern int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);
extern int EVP_MD_CTX_copy_ex(EVP_MD_CTX *out, const EVP_MD_CTX *in);

#define PAGE 4096
#define CHUNK 256
#define GIL_MIN 2048 /* as hashlib: smaller updates keep the GIL */

typedef struct {
	PyObject_HEAD
	EVP_MD_CTX *ctx;
	long queued, completed; /* absorb_pages_async jobs (under queue_lock) */
	int failed; /* 1: libcrypto failed, 2: a fork interrupted a job (this is the child) */
} Sha256;

/* -- the worker: one pthread, no Python in it, runs absorb_pages_async jobs in order ------------------ */
typedef struct job {
	struct job *next;
	Sha256 *sha; /* a reference, dropped when the job is reaped (with the GIL) */
	Py_buffer pages, offsets;
	unsigned char secinfo[48];
	int measure;
} Job;

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_cv = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static Job *pending_head, *pending_tail, *finished, *running;
static int worker_running;
/* Waking a sleeping thread on the other vCPU measured ~0.4 ms on the 2-core PVM machine (a batch's hash
 * of 128 pages): the worker spins (lock released) until spin_until before it sleeps, after each job and
 * after warm(); a waiter spins up to WAIT_SPIN_NS before it sleeps. */
#define JOB_SPIN_NS 300000L
#define WARM_SPIN_NS 5000000L
#define WAIT_SPIN_NS 5000000L
static int64_t spin_until;

static int64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000L + t.tv_nsec;
}

static PyTypeObject Sha256Type;
static int drain(Sha256 *s);

static PyObject *evp_error(const char *what)
{
	PyErr_Format(PyExc_ValueError, "libcrypto %s failed", what);
	return NULL;
}

static Sha256 *sha_alloc(void)
{
	Sha256 *s = PyObject_New(Sha256, &Sha256Type);
	if (!s)
		return NULL;
	s->queued = s->completed = 0;
	s->failed = 0;
	s->ctx = EVP_MD_CTX_new();
	if (!s->ctx) {
		Py_DECREF(s);
		return (Sha256 *)PyErr_NoMemory();
	}
	return s;
}

static void sha_dealloc(Sha256 *s)
{
	if (s->ctx)
		EVP_MD_CTX_free(s->ctx);
	PyObject_Free(s);
}

static PyObject *sha_new(PyObject *module, PyObject *noargs)
{
	Sha256 *s = sha_alloc();
	if (s && !EVP_DigestInit_ex(s->ctx, EVP_sha256(), NULL)) {
		Py_DECREF(s);
		return evp_error("EVP_DigestInit_ex");
	}
	return (PyObject *)s;
}

static PyObject *sha_update(Sha256 *s, PyObject *arg)
{
	Py_buffer b;
	int ok;
	if (drain(s) < 0 || PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
		return NULL;
	if (b.len >= GIL_MIN) {
		Py_BEGIN_ALLOW_THREADS
		ok = EVP_DigestUpdate(s->ctx, b.buf, (size_t)b.len);
		Py_END_ALLOW_THREADS
	} else {
		ok = EVP_DigestUpdate(s->ctx, b.buf, (size_t)b.len);
	}
	PyBuffer_Release(&b);
	if (!ok)
		return evp_error("EVP_DigestUpdate");
	Py_RETURN_NONE;
}

static int sha_final(Sha256 *s, unsigned char out[32])
{
	unsigned int len = 0;
	if (drain(s) < 0)
		return -1;
	EVP_MD_CTX *c = EVP_MD_CTX_new();
	int ok = c && EVP_MD_CTX_copy_ex(c, s->ctx) && EVP_DigestFinal_ex(c, out, &len) && len == 32;
	if (c)
		EVP_MD_CTX_free(c);
	return ok;
}

static PyObject *sha_digest(Sha256 *s, PyObject *noargs)
{
	unsigned char out[32];
	int r = sha_final(s, out);
	if (r <= 0)
		return r < 0 ? NULL : evp_error("EVP_DigestFinal_ex");
	return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *sha_hexdigest(Sha256 *s, PyObject *noargs)
{
	static const char hex[] = "0123456789abcdef";
	unsigned char out[32];
	char text[64];
	int r = sha_final(s, out);
	if (r <= 0)
		return r < 0 ? NULL : evp_error("EVP_DigestFinal_ex");
	for (int i = 0; i < 32; i++) {
		text[2 * i] = hex[out[i] >> 4];
		text[2 * i + 1] = hex[out[i] & 15];
	}
	return PyUnicode_FromStringAndSize(text, 64);
}

static PyObject *sha_copy(Sha256 *s, PyObject *noargs)
{
	if (drain(s) < 0)
		return NULL;
	Sha256 *t = sha_alloc();
	if (t && !EVP_MD_CTX_copy_ex(t->ctx, s->ctx)) {
		Py_DECREF(t);
		return evp_error("EVP_MD_CTX_copy_ex");
	}
	return (PyObject *)t;
}

/* The EADD (+ EEXTEND) blocks of n pages into ctx; no Python calls (runs without the GIL). */
static int absorb(EVP_MD_CTX *ctx, const unsigned char *p, const unsigned char *off, size_t n,
		  const unsigned char *secinfo, int measure)
{
	unsigned char eadd[64] = "EADD", ext[64] = "EEXTEND";
	int ok = 1;
	memcpy(eadd + 16, secinfo, 48);
	for (size_t i = 0; i < n && ok; i++, p += PAGE) {
		uint64_t o;
		memcpy(&o, off + 8 * i, 8); /* little-endian host, as the SDM's fields */
		memcpy(eadd + 8, &o, 8);
		ok = EVP_DigestUpdate(ctx, eadd, 64);
		for (int c = 0; measure && ok && c < PAGE / CHUNK; c++) {
			uint64_t oc = o + (uint64_t)c * CHUNK;
			memcpy(ext + 8, &oc, 8);
			ok = EVP_DigestUpdate(ctx, ext, 64) && EVP_DigestUpdate(ctx, p + c * CHUNK, CHUNK);
		}
	}
	return ok;
}

/* Under queue_lock, one step of waiting for cv's condition: before `until` a yield with the lock
 * released (spinning), after it sleep on cv. */
static void wait_step(pthread_cond_t *cv, int64_t until)
{
	if (now_ns() < until) {
		pthread_mutex_unlock(&queue_lock);
		sched_yield();
		pthread_mutex_lock(&queue_lock);
	} else {
		pthread_cond_wait(cv, &queue_lock);
	}
}

static void *worker_main(void *unused)
{
	pthread_mutex_lock(&queue_lock);
	for (;;) {
		while (!pending_head)
			wait_step(&work_cv, spin_until);
		Job *j = pending_head;
		pending_head = j->next;
		if (!pending_head)
			pending_tail = NULL;
		running = j;
		pthread_mutex_unlock(&queue_lock);
		int ok = j->sha->failed ? 1 : absorb(j->sha->ctx, j->pages.buf, j->offsets.buf,
						     (size_t)j->offsets.len / 8, j->secinfo, j->measure);
		pthread_mutex_lock(&queue_lock);
		running = NULL;
		if (!ok)
			j->sha->failed = 1;
		j->sha->completed++;
		j->next = finished;
		finished = j;
		int64_t until = now_ns() + JOB_SPIN_NS;
		if (until > spin_until)
			spin_until = until;
		pthread_cond_broadcast(&done_cv);
	}
	return NULL;
}

static void after_fork_child(void)
{
	/* The worker does not exist in a fork's child: the next job or wait starts one. A job it was running
	 * at the fork left that hash half-updated: it counts as failed (its wait raises), not as pending. */
	pthread_mutex_init(&queue_lock, NULL);
	pthread_cond_init(&work_cv, NULL);
	pthread_cond_init(&done_cv, NULL);
	worker_running = 0;
	if (running) {
		running->sha->failed = 2;
		running->sha->completed++;
		running->next = finished;
		finished = running;
		running = NULL;
	}
}

/* Under queue_lock: the worker runs (started if need be). 0, or an errno. */
static int start_worker(void)
{
	if (worker_running)
		return 0;
	pthread_t t;
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int err = pthread_create(&t, &attr, worker_main, NULL);
	pthread_attr_destroy(&attr);
	if (!err)
		worker_running = 1;
	return err;
}

/* Under queue_lock: a worker runs if any job is pending. */
static int ensure_worker(void)
{
	return pending_head ? start_worker() : 0;
}

/* With the GIL: release what finished jobs held. */
static void reap(void)
{
	pthread_mutex_lock(&queue_lock);
	Job *j = finished;
	finished = NULL;
	pthread_mutex_unlock(&queue_lock);
	while (j) {
		Job *next = j->next;
		PyBuffer_Release(&j->pages);
		PyBuffer_Release(&j->offsets);
		Py_DECREF(j->sha);
		PyMem_Free(j);
		j = next;
	}
}

/* Wait (GIL released) until every job of s has run; then reap. -1 with an exception set on failure. */
static int drain(Sha256 *s)
{
	int err = 0;
	pthread_mutex_lock(&queue_lock);
	int idle = s->completed >= s->queued;
	pthread_mutex_unlock(&queue_lock);
	if (!idle) { /* else (a per-page leaf's update: nothing queued) the GIL is kept */
		Py_BEGIN_ALLOW_THREADS
		int64_t spin_end = now_ns() + WAIT_SPIN_NS;
		pthread_mutex_lock(&queue_lock);
		err = ensure_worker();
		while (!err && s->completed < s->queued)
			wait_step(&done_cv, spin_end);
		pthread_mutex_unlock(&queue_lock);
		Py_END_ALLOW_THREADS
		reap();
	}
	if (err) {
		errno = err;
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	if (s->failed) {
		int why = s->failed;
		s->failed = 0;
		if (why == 2)
			PyErr_SetString(PyExc_ValueError, "the process forked while this hash absorbed pages: its state is lost");
		else
			evp_error("EVP_DigestUpdate");
		return -1;
	}
	return 0;
}

static PyObject *sha_wait(Sha256 *s, PyObject *noargs)
{
	if (drain(s) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *sha_completed(Sha256 *s, PyObject *noargs)
{
	pthread_mutex_lock(&queue_lock);
	long done = s->completed;
	pthread_mutex_unlock(&queue_lock);
	return PyLong_FromLong(done);
}

static int parse_pages(PyObject *args, Py_buffer *pages, Py_buffer *offsets, unsigned char secinfo[48], int *measure)
{
	Py_buffer si;
	if (!PyArg_ParseTuple(args, "y*y*y*p", pages, offsets, &si, measure))
		return -1;
	int bad = offsets->len % 8 || (size_t)pages->len < (size_t)offsets->len / 8 * PAGE || si.len != 48;
	if (!bad)
		memcpy(secinfo, si.buf, 48);
	PyBuffer_Release(&si);
	if (bad) {
		PyBuffer_Release(pages);
		PyBuffer_Release(offsets);
		PyErr_SetString(PyExc_ValueError,
				"absorb_pages: offsets must be int64, pages hold 4096 bytes per offset, secinfo 48 bytes");
		return -1;
	}
	return 0;
}

/* warm(): the worker (started if need be) spins for a few ms, ready for a job queued soon. */
static PyObject *warm(PyObject *module, PyObject *noargs)
{
	pthread_mutex_lock(&queue_lock);
	int64_t until = now_ns() + WARM_SPIN_NS;
	if (until > spin_until)
		spin_until = until;
	int err = start_worker();
	pthread_cond_signal(&work_cv);
	pthread_mutex_unlock(&queue_lock);
	if (err) {
		errno = err;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
}

/* absorb_pages_async(...): absorb_pages on the worker, after the jobs queued before (of any hash);
 * the buffers are held until it has run. Returns the job's number: done once completed() reaches it. */
static PyObject *sha_absorb_pages_async(Sha256 *s, PyObject *args)
{
	Job *j = PyMem_Calloc(1, sizeof(Job));
	if (!j)
		return PyErr_NoMemory();
	if (parse_pages(args, &j->pages, &j->offsets, j->secinfo, &j->measure) < 0) {
		PyMem_Free(j);
		return NULL;
	}
	reap();
	Py_INCREF(s);
	j->sha = s;
	pthread_mutex_lock(&queue_lock);
	if (pending_tail)
		pending_tail->next = j;
	else
		pending_head = j;
	pending_tail = j;
	long seq = ++s->queued;
	int err = ensure_worker();
	pthread_cond_signal(&work_cv);
	pthread_mutex_unlock(&queue_lock);
	if (err) {
		errno = err;
		return PyErr_SetFromErrno(PyExc_OSError); /* the job stays queued; the next wait retries */
	}
	return PyLong_FromLong(seq);
}

/* absorb_pages(pages, offsets, secinfo48, measure): page i is pages[i * 4096:(i + 1) * 4096], at
 * enclave offset offsets[i] (int64). Per page the EADD block, then with measure for each 256-byte
 * chunk c its EEXTEND block (offset + 256 c) and the chunk. */
static PyObject *sha_absorb_pages(Sha256 *s, PyObject *args)
{
	Py_buffer pages, offsets;
	unsigned char secinfo[48];
	int measure, ok;
	if (drain(s) < 0)
		return NULL;
	if (parse_pages(args, &pages, &offsets, secinfo, &measure) < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	ok = absorb(s->ctx, pages.buf, offsets.buf, (size_t)offsets.len / 8, secinfo, measure);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&pages);
	PyBuffer_Release(&offsets);
	if (!ok)
		return evp_error("EVP_DigestUpdate");
	Py_RETURN_NONE;
}

/* gather(sources, out): page i of the list sources (each exactly 4096 bytes) to out[i * 4096:]. */
static PyObject *gather(PyObject *module, PyObject *args)
{
	PyObject *list;
	Py_buffer out;
	if (!PyArg_ParseTuple(args, "O!w*", &PyList_Type, &list, &out))
		return NULL;
	Py_ssize_t n = PyList_GET_SIZE(list), got = 0;
	Py_buffer *src = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
	PyObject *result = NULL;
	if (!src) {
		PyErr_NoMemory();
		goto done;
	}
	if (out.len < n * PAGE) {
		PyErr_SetString(PyExc_ValueError, "gather: the output holds fewer pages than the list");
		goto done;
	}
	for (; got < n; got++) {
		if (PyObject_GetBuffer(PyList_GET_ITEM(list, got), &src[got], PyBUF_SIMPLE) < 0)
			goto done;
		if (src[got].len != PAGE) {
			PyBuffer_Release(&src[got]);
			PyErr_Format(PyExc_ValueError, "gather: source %zd is %zd bytes, not 4096", got, src[got].len);
			goto done;
		}
	}
	Py_BEGIN_ALLOW_THREADS
	for (Py_ssize_t i = 0; i < n; i++)
		memcpy((char *)out.buf + i * PAGE, src[i].buf, PAGE);
	Py_END_ALLOW_THREADS
	result = Py_None;
	Py_INCREF(result);
done:
	for (Py_ssize_t i = 0; src && i < got; i++)
		PyBuffer_Release(&src[i]);
	PyMem_Free(src);
	PyBuffer_Release(&out);
	return result;
}

static PyMethodDef sha_methods[] = {
	{"update", (PyCFunction)sha_update, METH_O, "Feed bytes, as hashlib's update."},
	{"digest", (PyCFunction)sha_digest, METH_NOARGS, "The 32-byte digest of what was fed so far."},
	{"hexdigest", (PyCFunction)sha_hexdigest, METH_NOARGS, "digest() as hex."},
	{"copy", (PyCFunction)sha_copy, METH_NOARGS, "An independent copy of the state."},
	{"absorb_pages", (PyCFunction)sha_absorb_pages, METH_VARARGS,
	 "absorb_pages(pages, offsets, secinfo48, measure): the EADD (+ EEXTEND) blocks of many pages."},
	{"absorb_pages_async", (PyCFunction)sha_absorb_pages_async, METH_VARARGS,
	 "absorb_pages on the worker thread (buffers held until done); returns the job number."},
	{"wait", (PyCFunction)sha_wait, METH_NOARGS, "Wait until every queued job of this hash has run."},
	{"completed", (PyCFunction)sha_completed, METH_NOARGS, "How many queued jobs of this hash have run."},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject Sha256Type = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "_vepc_measure.Sha256",
	.tp_basicsize = sizeof(Sha256),
	.tp_dealloc = (destructor)sha_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "SHA-256 over libcrypto's EVP interface.",
	.tp_methods = sha_methods,
};

static PyMethodDef module_methods[] = {
	{"sha256", sha_new, METH_NOARGS, "A new SHA-256."},
	{"gather", gather, METH_VARARGS, "gather(sources, out): copy listed 4096-byte pages into out."},
	{"warm", warm, METH_NOARGS, "Have the worker spin for a few ms, ready for a job queued soon."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
	PyModuleDef_HEAD_INIT, "_vepc_measure", "MRENCLAVE's SHA-256 (vepc.silicon.native_measure).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__vepc_measure(void)
{
	if (PyType_Ready(&Sha256Type) < 0)
		return NULL;
	pthread_atfork(NULL, NULL, after_fork_child);
	return PyModule_Create(&module_def);
}
