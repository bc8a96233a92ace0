/*
 * The isolation forest's tree walk in C: for each row, the sum over the trees
 * of the path length to the leaf it reaches (models/forest.py, _StackedTrees).
 *
 * The numpy walk there is the reference and the fallback: it steps every
 * (tree, row) pair down one level at a time, `levels` times, which costs a
 * dozen array passes per level; this walks each pair to its leaf in one loop
 * (8 rows at a time, see below). Same nodes, same comparison (value <=
 * threshold goes left, so a NaN goes right), at most `levels` steps, and the
 * lengths summed tree by tree in tree order (the numpy walk too, by a
 * cumulative sum): the sums are equal bit for bit (tests/test_learned.py).
 * Every node number is checked against the arrays' bounds: a model file is
 * input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

enum { LANES = 8 }; /* rows walked down a tree together */

typedef struct {
    Py_buffer view;
    int held;
} Buffer;

/* A C-contiguous 1-D or 2-D buffer of `itemsize`-byte items of one of `formats`. */
static int take(PyObject *object, Buffer *buffer, Py_ssize_t itemsize, const char *formats, const char *name,
                int writable) {
    if (PyObject_GetBuffer(object, &buffer->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0))
        < 0)
        return -1;
    buffer->held = 1;
    const char *format = buffer->view.format ? buffer->view.format : "B";
    if (*format == '<' || *format == '=' || *format == '@')
        format++;
    if (buffer->view.itemsize != itemsize || strlen(format) != 1 || strchr(formats, *format) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: an array of %zd-byte items of type %s wanted, got '%s'", name, itemsize,
                     formats, buffer->view.format ? buffer->view.format : "B");
        return -1;
    }
    return 0;
}

static void release(Buffer *buffers, int count) {
    for (int i = 0; i < count; i++)
        if (buffers[i].held)
            PyBuffer_Release(&buffers[i].view);
}

PyDoc_STRVAR(path_lengths_doc,
             "path_lengths(feature, threshold, left, right, leaf_length, roots, levels, rows, out)\n"
             "Fills out[r] with the sum over the trees of leaf_length at the node row r reaches from each root.\n"
             "feature, left, right, roots: intp; threshold, leaf_length, rows (rows x columns), out: float64.");

static PyObject *path_lengths(PyObject *Py_UNUSED(self), PyObject *args) {
    enum { FEATURE, THRESHOLD, LEFT, RIGHT, LEAF, ROOTS, ROWS, OUT, COUNT };
    static const char *names[COUNT] = {"feature", "threshold", "left", "right", "leaf_length", "roots", "rows", "out"};
    PyObject *sources[COUNT];
    Py_ssize_t levels;
    if (!PyArg_ParseTuple(args, "OOOOOOnOO", &sources[FEATURE], &sources[THRESHOLD], &sources[LEFT], &sources[RIGHT],
                          &sources[LEAF], &sources[ROOTS], &levels, &sources[ROWS], &sources[OUT]))
        return NULL;
    Buffer b[COUNT];
    memset(b, 0, sizeof(b));
    for (int i = 0; i < COUNT; i++) {
        int integral = i == FEATURE || i == LEFT || i == RIGHT || i == ROOTS;
        if (take(sources[i], &b[i], integral ? (Py_ssize_t)sizeof(Py_ssize_t) : (Py_ssize_t)sizeof(double),
                 integral ? "lqn" : "d", names[i], i == OUT) < 0) {
            release(b, COUNT);
            return NULL;
        }
    }
    const Py_ssize_t nodes = b[FEATURE].view.len / (Py_ssize_t)sizeof(Py_ssize_t);
    const Py_ssize_t trees = b[ROOTS].view.len / (Py_ssize_t)sizeof(Py_ssize_t);
    const Py_ssize_t count = b[OUT].view.len / (Py_ssize_t)sizeof(double);
    const Py_ssize_t columns = b[ROWS].view.ndim == 2 ? b[ROWS].view.shape[1] : 0;
    const char *bad = NULL;
    if (b[ROWS].view.ndim != 2 || b[ROWS].view.shape[0] != count)
        bad = "rows must be 2-D with a row per out item";
    else if (b[THRESHOLD].view.len / (Py_ssize_t)sizeof(double) != nodes
             || b[LEFT].view.len / (Py_ssize_t)sizeof(Py_ssize_t) != nodes
             || b[RIGHT].view.len / (Py_ssize_t)sizeof(Py_ssize_t) != nodes
             || b[LEAF].view.len / (Py_ssize_t)sizeof(double) != nodes)
        bad = "the node arrays differ in length";
    if (bad != NULL) {
        release(b, COUNT);
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    const Py_ssize_t *feature = b[FEATURE].view.buf, *left = b[LEFT].view.buf, *right = b[RIGHT].view.buf,
                     *roots = b[ROOTS].view.buf;
    const double *threshold = b[THRESHOLD].view.buf, *leaf = b[LEAF].view.buf, *values = b[ROWS].view.buf;
    double *out = b[OUT].view.buf;
    /* Tree by tree (its nodes stay in cache), each row's sum in tree order. The rows
     * go down a tree LANES at a time, a level per pass, each step chosen without a
     * branch (a row at its leaf stays there): the walks are independent chains of
     * loads, which the processor overlaps, where a branch per step on the data was
     * mispredicted half the time. */
    for (Py_ssize_t r = 0; r < count; r++)
        out[r] = 0.0;
    for (Py_ssize_t t = 0; t < trees && bad == NULL; t++) {
        const Py_ssize_t root = roots[t];
        if (root < 0 || root >= nodes) {
            bad = "a root outside the trees";
            break;
        }
        for (Py_ssize_t first = 0; first < count && bad == NULL; first += LANES) {
            const int lanes = count - first < LANES ? (int)(count - first) : LANES;
            Py_ssize_t node[LANES];
            const double *row[LANES];
            for (int i = 0; i < lanes; i++) {
                node[i] = root;
                row[i] = values + (first + i) * columns;
            }
            for (Py_ssize_t step = 0; step < levels && bad == NULL; step++) {
                Py_ssize_t inner = 0; /* any lane not at its leaf yet */
                for (int i = 0; i < lanes; i++) {
                    const Py_ssize_t at = node[i], go_left = left[at];
                    Py_ssize_t column = feature[at];
                    if ((size_t)column >= (size_t)columns) {
                        if (go_left >= 0) {
                            bad = "a split on a column the rows do not have";
                            break;
                        }
                        column = 0; /* a leaf's column is never read */
                    }
                    /* !(<=): a NaN goes right, as in the numpy walk */
                    const Py_ssize_t go_right = -(Py_ssize_t)!(row[i][column] <= threshold[at]);
                    const Py_ssize_t child = go_left ^ ((go_left ^ right[at]) & go_right);
                    const Py_ssize_t leaf_mask = go_left >> (8 * sizeof(Py_ssize_t) - 1); /* all ones at a leaf */
                    const Py_ssize_t next = (at & leaf_mask) | (child & ~leaf_mask);
                    if ((size_t)next >= (size_t)nodes) {
                        bad = "a child outside the trees";
                        break;
                    }
                    node[i] = next;
                    inner |= ~leaf_mask;
                }
                if (!inner)
                    break;
            }
            if (bad == NULL)
                for (int i = 0; i < lanes; i++)
                    out[first + i] += leaf[node[i]];
        }
    }
    release(b, COUNT);
    if (bad != NULL) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"path_lengths", path_lengths, METH_VARARGS, path_lengths_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_forest", "The isolation forest's tree walk in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__forest(void) { return PyModule_Create(&module); }
