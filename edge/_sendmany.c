/* A burst of small sends to many sockets, made by a helper thread without the GIL while the event
 * loop's thread is still preparing the burst's later answers; at the end both threads send what
 * is left. Used by edge/burst.py for a wake's answers.
 *
 *   burst = Burst(capacity)
 *   burst.add(transport, fd, head, middle, tail)   # with the GIL: the helper may send it at once
 *   burst.finish() -> [(transport, bytes not sent), ...]
 *
 * Why C: a Python thread releases and takes the GIL around every send, so two Python threads (and
 * the transcoders') spend a burst handing the GIL to each other. Here the helper never takes it.
 *
 * An answer is three bytes objects sent as one (sendmsg with three iovecs): most of a burst's
 * answers share their head and tail and differ in a request id between, and joining them first
 * would allocate the whole burst's bytes anew (20 MB for 10,000 playlists, most of the burst's
 * Python time). The helper reads only the fd and the iovecs; the Burst holds a reference to each
 * transport and bytes object until it is freed, after the helper has ended. A Burst freed
 * without finish() sends nothing more.
 *
 * The two threads are kept on different cores for the burst: the caller on the one it is on, the
 * helper on the others. Left to the scheduler, in about one burst in eight both ran on one core
 * for the whole send phase while the other was idle or busy elsewhere, and that burst took 65-90
 * ms instead of 50 (bench/README.md, session 11). The caller's own CPU set is restored when the
 * burst ends.
 *
 * A send the kernel does not take whole (a full socket buffer, an error) is returned by finish()
 * with the bytes it did not take, for the caller to write through the transport. So a burst holds
 * at most one answer per socket: a second would overtake the first's rest.
 */
#define _GNU_SOURCE /* CPU sets, thread names */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define PUBLISH_EVERY 16 /* items added before the helper is told */
#define CLAIM 8          /* items a thread takes at a time */
/* Sends between two yields of the CPU. On loopback and veth (a proxy or sidecar in front of the
 * node) every send queues a packet on this CPU's backlog, which softirq processing drains; under
 * load the kernel leaves that to ksoftirqd, a thread like ours, and a burst that does not let it
 * run fills the backlog (net.core.netdev_max_backlog, 1,000 packets) and the kernel drops
 * answers: TCP resends each after about 200 ms. Seen in bench/waiters.py: a part in a few
 * answered 200 ms late, with drops counted in /proc/net/softnet_stat; none with the yields. */
#define YIELD_EVERY 64

#define PIECES 3
#define HELPER_NAME "livedge-burst"

typedef struct {
    int fd;
    struct iovec pieces[PIECES];
    Py_ssize_t length;
    Py_ssize_t sent;
    PyObject *transport;
    PyObject *objects[PIECES];
} Item;

typedef struct {
    PyObject_HEAD
    Item *items;
    Py_ssize_t capacity;
    Py_ssize_t added;     /* written by add(), with the GIL */
    Py_ssize_t published; /* under lock: items the threads may send */
    Py_ssize_t claimed;   /* under lock: items a thread has taken */
    int closing;          /* under lock: nothing more will be published */
    int started;
    int finished;
    pthread_t helper;
    int pinned;            /* the caller is held to one core until the burst ends */
    pid_t caller;          /* the thread that made the burst */
    cpu_set_t caller_cpus; /* its CPU set before */
    pthread_mutex_t lock;
    pthread_cond_t more;
} Burst;

static void send_item(Item *item) {
    struct msghdr message;
    memset(&message, 0, sizeof message);
    message.msg_iov = item->pieces;
    message.msg_iovlen = PIECES;
    ssize_t sent;
    do {
        sent = sendmsg(item->fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    item->sent = sent < 0 ? 0 : (Py_ssize_t)sent;
}

/* Send published items until none is left; with wait, also wait for more until closing. */
static void send_published(Burst *self, int wait) {
    Py_ssize_t sent = 0;
    for (;;) {
        pthread_mutex_lock(&self->lock);
        while (wait && self->claimed == self->published && !self->closing)
            pthread_cond_wait(&self->more, &self->lock);
        Py_ssize_t first = self->claimed;
        Py_ssize_t last = first + CLAIM < self->published ? first + CLAIM : self->published;
        self->claimed = last;
        pthread_mutex_unlock(&self->lock);
        if (first == last)
            return;
        for (Py_ssize_t i = first; i < last; i++) {
            send_item(&self->items[i]);
            if (++sent % YIELD_EVERY == 0)
                sched_yield();
        }
    }
}

static void *helper_main(void *arg) {
    send_published((Burst *)arg, 1);
    return NULL;
}

static void publish(Burst *self, int closing) {
    pthread_mutex_lock(&self->lock);
    self->published = self->added;
    if (closing)
        self->closing = 1;
    pthread_cond_signal(&self->more);
    pthread_mutex_unlock(&self->lock);
}

/* Hold the calling thread to the core it is on and return, in ``others``, the cores the helper
 * may use; false (nothing changed) where there is no other core. A thread or process the caller
 * started meanwhile would inherit that one core for good: it starts none during a burst. */
static int pin_caller(Burst *self, cpu_set_t *others) {
    int cpu = sched_getcpu();
    if (cpu < 0 || sched_getaffinity(0, sizeof *others, others) != 0 || !CPU_ISSET(cpu, others)
            || CPU_COUNT(others) < 2)
        return 0;
    cpu_set_t mine;
    CPU_ZERO(&mine);
    CPU_SET(cpu, &mine);
    self->caller_cpus = *others;
    self->caller = (pid_t)syscall(SYS_gettid);
    if (sched_setaffinity(0, sizeof mine, &mine) != 0)
        return 0;
    self->pinned = 1;
    CPU_CLR(cpu, others);
    return 1;
}

/* Give the caller back its CPU set, from whichever thread ends the burst: only if the caller is
 * still a thread of this process (a thread id is reused once its thread has ended). */
static void unpin_caller(Burst *self) {
    if (!self->pinned)
        return;
    self->pinned = 0;
    pid_t me = (pid_t)syscall(SYS_gettid); /* glibc before 2.30 has no gettid() */
    if (me != self->caller && syscall(SYS_tgkill, getpid(), self->caller, 0) != 0)
        return;
    if (sched_setaffinity(self->caller, sizeof self->caller_cpus, &self->caller_cpus) != 0) {
        /* Its set is no longer allowed (the container's cpuset changed meanwhile): every core
         * the kernel allows, rather than one core for good. */
        cpu_set_t every;
        memset(&every, 0xff, sizeof every);
        sched_setaffinity(self->caller, sizeof every, &every);
    }
}

/* Close the burst and wait for the helper: every published item is sent. The GIL stays held:
 * released, it would go to another thread (a transcoder's) that need not give it back before its
 * switch interval, which a burst lengthens (edge/fastlane.py); the helper never takes it. */
static void wind_down(Burst *self) {
    if (self->finished)
        return;
    self->finished = 1;
    publish(self, 1);
    send_published(self, 0);
    if (self->started)
        pthread_join(self->helper, NULL);
    unpin_caller(self);
}

static int Burst_init(Burst *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"capacity", NULL};
    Py_ssize_t capacity;
    if (self->items != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Burst is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n", keywords, &capacity))
        return -1;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must not be negative");
        return -1;
    }
    self->items = PyMem_Calloc(capacity ? (size_t)capacity : 1, sizeof(Item));
    if (self->items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->capacity = capacity;
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->more, NULL);
    /* The helper on the cores other than the caller's (pin_caller). Without a helper (it could
     * not start) the caller sends everything in finish(), on any core. */
    pthread_attr_t attributes;
    cpu_set_t others;
    if (pthread_attr_init(&attributes) == 0) {
        if (pin_caller(self, &others)
                && pthread_attr_setaffinity_np(&attributes, sizeof others, &others) != 0)
            unpin_caller(self);
        self->started = pthread_create(&self->helper, &attributes, helper_main, self) == 0;
        if (self->started) /* named here, not by itself: named before Burst() returns */
            pthread_setname_np(self->helper, HELPER_NAME); /* top -H, the tests */
        pthread_attr_destroy(&attributes);
    }
    if (!self->started)
        unpin_caller(self);
    return 0;
}

static PyObject *Burst_add(Burst *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 + PIECES || !PyBytes_Check(args[2]) || !PyBytes_Check(args[3])
            || !PyBytes_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "add(transport, fd, head, middle, tail): bytes");
        return NULL;
    }
    /* The fd first: converting it may run Python code (__index__), which may use this burst. */
    long fd = PyLong_AsLong(args[1]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return NULL;
    }
    if (self->items == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the burst is not initialised");
        return NULL;
    }
    if (self->finished) {
        PyErr_SetString(PyExc_RuntimeError, "the burst is finished");
        return NULL;
    }
    if (self->added == self->capacity) {
        PyErr_SetString(PyExc_OverflowError, "the burst is full");
        return NULL;
    }
    Item *item = &self->items[self->added];
    item->fd = (int)fd;
    item->length = 0;
    for (int i = 0; i < PIECES; i++) {
        PyObject *piece = args[2 + i];
        item->pieces[i].iov_base = PyBytes_AS_STRING(piece);
        item->pieces[i].iov_len = (size_t)PyBytes_GET_SIZE(piece);
        item->length += PyBytes_GET_SIZE(piece);
        Py_INCREF(piece);
        item->objects[i] = piece;
    }
    Py_INCREF(args[0]);
    item->transport = args[0];
    if (++self->added % PUBLISH_EVERY == 0)
        publish(self, 0);
    Py_RETURN_NONE;
}

/* The bytes of ``item`` the kernel did not take. */
static PyObject *rest_of(const Item *item) {
    PyObject *rest = PyBytes_FromStringAndSize(NULL, item->length - item->sent);
    if (rest == NULL)
        return NULL;
    char *to = PyBytes_AS_STRING(rest);
    Py_ssize_t skip = item->sent;
    for (int i = 0; i < PIECES; i++) {
        Py_ssize_t length = (Py_ssize_t)item->pieces[i].iov_len;
        if (skip >= length) {
            skip -= length;
            continue;
        }
        memcpy(to, (const char *)item->pieces[i].iov_base + skip, (size_t)(length - skip));
        to += length - skip;
        skip = 0;
    }
    return rest;
}

static PyObject *Burst_finish(Burst *self, PyObject *unused) {
    if (self->items == NULL || self->finished) {
        PyErr_SetString(PyExc_RuntimeError, self->items == NULL ? "the burst is not initialised"
                                                                : "the burst is finished");
        return NULL;
    }
    wind_down(self);
    PyObject *short_sends = PyList_New(0);
    if (short_sends == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->added; i++) {
        Item *item = &self->items[i];
        if (item->sent == item->length)
            continue;
        PyObject *rest = rest_of(item);
        PyObject *pair = rest == NULL ? NULL : Py_BuildValue("(ON)", item->transport, rest);
        if (pair == NULL || PyList_Append(short_sends, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(short_sends);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return short_sends;
}

/* Dropped without finish(): send nothing more (by the time it is freed, its sockets may be closed
 * and their numbers reused); the helper ends after the items it holds. */
static void abandon(Burst *self) {
    if (self->finished)
        return;
    self->finished = 1;
    pthread_mutex_lock(&self->lock);
    self->published = self->claimed;
    self->closing = 1;
    pthread_cond_signal(&self->more);
    pthread_mutex_unlock(&self->lock);
    if (self->started)
        pthread_join(self->helper, NULL);
    unpin_caller(self);
}

static void Burst_dealloc(Burst *self) {
    if (self->items != NULL) {
        abandon(self);
        for (Py_ssize_t i = 0; i < self->added; i++) {
            Py_DECREF(self->items[i].transport);
            for (int piece = 0; piece < PIECES; piece++)
                Py_DECREF(self->items[i].objects[piece]);
        }
        PyMem_Free(self->items);
        pthread_mutex_destroy(&self->lock);
        pthread_cond_destroy(&self->more);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Burst_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Burst_add, METH_FASTCALL,
     "add(transport, fd, head, middle, tail): queue one answer; the helper may send it at once"},
    {"finish", (PyCFunction)Burst_finish, METH_NOARGS,
     "finish() -> [(transport, bytes not sent), ...]: make every send, on both threads"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Burst_members[] = {
    {"added", T_PYSSIZET, offsetof(Burst, added), READONLY, "answers added"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BurstType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "edge._sendmany.Burst",
    .tp_doc = "Burst(capacity): sends made by a helper thread as they are added",
    .tp_basicsize = sizeof(Burst),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Burst_init,
    .tp_dealloc = (destructor)Burst_dealloc,
    .tp_methods = Burst_methods,
    .tp_members = Burst_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edge._sendmany", "A burst of sends, made without the GIL.", -1, NULL,
};

PyMODINIT_FUNC PyInit__sendmany(void) {
    if (PyType_Ready(&BurstType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&BurstType);
    if (PyModule_AddObject(m, "Burst", (PyObject *)&BurstType) < 0) {
        Py_DECREF(&BurstType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
