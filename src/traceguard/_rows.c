/*
 * Span rows in C, the two per-span hot paths:
 *
 * decode_spans: serialized ExportTraceServiceRequest / TracesData bytes ->
 * SpanRow objects, reading only the fields detection keeps.
 *
 * The caller has already parsed the same bytes with upb (FromString), so the
 * message is known to be valid protobuf and every validation rule is upb's;
 * this walk only has to read the same values the reference decoder
 * (otlp_proto.decode_traces_message) reads, with protobuf's merge rules: the
 * last occurrence of a scalar wins, repeated fields append, a field whose wire
 * type does not match its declaration is an unknown field. Anything it does
 * not expect (groups, a length running past its message) raises Unsupported,
 * and the caller falls back to the reference decoder, so output never differs.
 * tests/test_rows.py checks it against the reference on the scenario's
 * traffic and on mutated messages.
 *
 * expand: a decided trace's rows -> Span objects and the indexes every
 * detector uses (assembler._expand_rows is the reference).
 *
 * Both build SpanRow and Span objects by filling their __slots__ directly
 * (offsets read from the classes' member descriptors by bind()): running the
 * Python __init__ per span cost as much as the rest of the decode.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

static PyObject *Unsupported;

/* A class with __slots__, and the offsets of the slots in the order given to bind(). */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset[11];
    int count;
} Slots;

static Slots row_slots, span_slots;
static const char *ROW_SLOTS[] = {"trace_id", "core", "end", "service", "name", "attrs", NULL};
static const char *SPAN_SLOTS[] = {"span_id", "parent_span_id", "start", "end", "kind", "status", "has_links",
                                   "service", "name", "attrs", "finished", NULL};
enum { ROW_TRACE_ID, ROW_CORE, ROW_END, ROW_SERVICE, ROW_NAME, ROW_ATTRS };

static int bind_slots(Slots *slots, PyObject *type, const char **names) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind() takes classes");
        return -1;
    }
    Py_ssize_t offsets[11];
    int i;
    for (i = 0; names[i] != NULL; i++) {
        PyObject *descr = PyObject_GetAttrString(type, names[i]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s is not a __slots__ member of %R", names[i], type);
            return -1;
        }
    }
    Py_XDECREF(slots->type);
    Py_INCREF(type);
    slots->type = (PyTypeObject *)type;
    memcpy(slots->offset, offsets, sizeof(offsets));
    slots->count = i;
    return 0;
}

/* A new instance with its slots set; steals the references in values. */
static PyObject *fill(Slots *slots, PyObject **values) {
    PyObject *obj = slots->type->tp_alloc(slots->type, 0);
    for (int i = 0; i < slots->count; i++) {
        if (obj == NULL)
            Py_DECREF(values[i]);
        else
            *(PyObject **)((char *)obj + slots->offset[i]) = values[i];
    }
    return obj;
}

#define SLOT(slots, obj, i) (*(PyObject **)((char *)(obj) + (slots).offset[i]))

static PyObject *bind(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *row_type, *span_type;
    if (!PyArg_ParseTuple(args, "OO", &row_type, &span_type))
        return NULL;
    if (bind_slots(&row_slots, row_type, ROW_SLOTS) < 0 || bind_slots(&span_slots, span_type, SPAN_SLOTS) < 0)
        return NULL;
    Py_RETURN_NONE;
}

enum { VARINT = 0, I64 = 1, LEN = 2, I32 = 5 };
enum { KIND_CLIENT = 3, KIND_PRODUCER = 4, KIND_CONSUMER = 5, STATUS_ERROR = 2 };
#define CORE_SIZE 27 /* records.SPAN_CORE: <8s8sQBBB */

typedef struct {
    const uint8_t *p, *end;
} Reader;

typedef struct {
    uint32_t field;
    int wire;
    uint64_t value;          /* VARINT, I64, I32 */
    const uint8_t *data;     /* LEN */
    Py_ssize_t size;
} Field;

/* Reads the next field; returns 1, 0 at the end, -1 on anything unexpected. */
static int next_field(Reader *r, Field *f) {
    if (r->p >= r->end)
        return 0;
    uint64_t key = 0, v = 0;
    int shift;
    for (shift = 0;; shift += 7) {
        if (r->p >= r->end || shift > 63)
            return -1;
        uint8_t b = *r->p++;
        key |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            break;
    }
    f->field = (uint32_t)(key >> 3);
    f->wire = (int)(key & 7);
    switch (f->wire) {
    case VARINT:
    case LEN:
        for (shift = 0;; shift += 7) {
            if (r->p >= r->end || shift > 63)
                return -1;
            uint8_t b = *r->p++;
            v |= (uint64_t)(b & 0x7f) << shift;
            if (!(b & 0x80))
                break;
        }
        if (f->wire == VARINT) {
            f->value = v;
            return 1;
        }
        if (v > (uint64_t)(r->end - r->p))
            return -1;
        f->data = r->p;
        f->size = (Py_ssize_t)v;
        r->p += v;
        return 1;
    case I64:
        if (r->end - r->p < 8)
            return -1;
        memcpy(&v, r->p, 8); /* little-endian host assumed, checked at import */
        f->value = v;
        r->p += 8;
        return 1;
    case I32:
        if (r->end - r->p < 4) return -1;
        r->p += 4;
        return 1;
    default: /* groups */
        return -1;
    }
}

#define FOR_FIELDS(reader, f, status) while (((status) = next_field(&(reader), &(f))) > 0)
#define READER(f) ((Reader){(f).data, (f).data + (f).size})

static int unsupported(void) {
    PyErr_SetString(Unsupported, "message layout not handled by the fast decoder");
    return -1;
}

/* AnyValue: which oneof member was set last, and the string if that was string_value. */
static int any_value_string(Reader r, uint32_t *which, const uint8_t **text, Py_ssize_t *size) {
    static const int wire_of[8] = {-1, LEN, VARINT, VARINT, I64, LEN, LEN, LEN};
    Field f;
    int status;
    FOR_FIELDS(r, f, status) {
        if (f.field >= 1 && f.field <= 7 && f.wire == wire_of[f.field]) {
            *which = f.field;
            if (f.field == 1) {
                *text = f.data;
                *size = f.size;
            }
        }
    }
    return status;
}

/* service.name of a ResourceSpans' resource(s): the first KeyValue with that key. */
static int resource_service(Reader rs, const uint8_t **text, Py_ssize_t *size, int *found) {
    Field f, a, kv;
    int status, s2, s3;
    FOR_FIELDS(rs, f, status) {
        if (f.field != 1 || f.wire != LEN)
            continue;
        Reader resource = READER(f);
        FOR_FIELDS(resource, a, s2) {
            if (a.field != 1 || a.wire != LEN || *found)
                continue;
            Reader pair = READER(a);
            const uint8_t *key = NULL;
            Py_ssize_t key_size = 0;
            uint32_t which = 0;
            const uint8_t *value = NULL;
            Py_ssize_t value_size = 0;
            FOR_FIELDS(pair, kv, s3) {
                if (kv.field == 1 && kv.wire == LEN) {
                    key = kv.data;
                    key_size = kv.size;
                } else if (kv.field == 2 && kv.wire == LEN) {
                    if (any_value_string(READER(kv), &which, &value, &value_size) < 0)
                        return -1;
                }
            }
            if (s3 < 0)
                return -1;
            if (key_size == 12 && memcmp(key, "service.name", 12) == 0) {
                *found = 1;
                *text = which == 1 ? value : NULL;
                *size = which == 1 ? value_size : 0;
            }
        }
        if (s2 < 0)
            return -1;
    }
    return status;
}

static PyObject *clipped_interned(const uint8_t *text, Py_ssize_t size, Py_ssize_t limit) {
    PyObject *s = PyUnicode_DecodeUTF8((const char *)text, size, NULL);
    if (s == NULL)
        return NULL;
    if (PyUnicode_GET_LENGTH(s) > limit) {
        PyObject *cut = PyUnicode_Substring(s, 0, limit);
        Py_DECREF(s);
        if (cut == NULL)
            return NULL;
        s = cut;
    }
    PyUnicode_InternInPlace(&s);
    return s;
}

static void hex(char *out, const uint8_t *data, Py_ssize_t size) {
    static const char digits[] = "0123456789abcdef";
    for (Py_ssize_t i = 0; i < size; i++) {
        out[2 * i] = digits[data[i] >> 4];
        out[2 * i + 1] = digits[data[i] & 15];
    }
    out[2 * size] = 0;
}

typedef struct {
    PyObject *rows, *errors, *pending, *stages, *service;
    Py_ssize_t name_limit, max_errors, rejected;
    Py_ssize_t resource_index, scope_index, span_index;
} Out;

/* The reference decoder's rejection messages, word for word. */
static int reject(Out *o, const uint8_t *trace, Py_ssize_t trace_size, const uint8_t *span, Py_ssize_t span_size,
                  Py_ssize_t parent_size, int which) {
    o->rejected++;
    if (PyList_GET_SIZE(o->errors) >= o->max_errors)
        return 0;
    /* Only the first rejection can meet a span id of any length: the later ones
     * come after the trace id (16 bytes) and the span id (8) were checked. */
    char a[2 * 64 + 1];
    PyObject *message;
    if (which == 0) {
        if (span_size > 64) return unsupported();
        hex(a, span, span_size);
        message = PyUnicode_FromFormat("span %s: trace_id must be 16 non-zero bytes, got %zd",
                                       span_size ? a : "?", trace_size);
    } else if (which == 1) {
        hex(a, trace, trace_size);
        message = PyUnicode_FromFormat("trace %s: span_id must be 8 non-zero bytes, got %zd", a, span_size);
    } else {
        hex(a, span, span_size);
        message = PyUnicode_FromFormat("span %s: parent_span_id must be empty or 8 bytes, got %zd", a, parent_size);
    }
    if (message == NULL)
        return -1;
    int rc = PyList_Append(o->errors, message);
    Py_DECREF(message);
    return rc;
}

static const uint8_t ZERO[16];

static int span(Out *o, Reader r) {
    const uint8_t *trace = NULL, *span_id = NULL, *parent = NULL, *name = (const uint8_t *)"";
    Py_ssize_t trace_size = 0, span_size = 0, parent_size = 0, name_size = 0;
    uint64_t start = 0, end = 0;
    int64_t kind = 0, code = 0;
    int links = 0;
    Field f, s;
    int status, s2;
    FOR_FIELDS(r, f, status) {
        switch (f.field) {
        case 1: if (f.wire == LEN) { trace = f.data; trace_size = f.size; } break;
        case 2: if (f.wire == LEN) { span_id = f.data; span_size = f.size; } break;
        case 4: if (f.wire == LEN) { parent = f.data; parent_size = f.size; } break;
        case 5: if (f.wire == LEN) { name = f.data; name_size = f.size; } break;
        case 6: if (f.wire == VARINT) kind = (int32_t)f.value; break;
        case 7: if (f.wire == I64) start = f.value; break;
        case 8: if (f.wire == I64) end = f.value; break;
        case 13: if (f.wire == LEN) links = 1; break;
        case 15:
            if (f.wire == LEN) {
                Reader st = READER(f);
                FOR_FIELDS(st, s, s2) {
                    if (s.field == 3 && s.wire == VARINT)
                        code = (int32_t)s.value;
                }
                if (s2 < 0) return unsupported();
            }
            break;
        }
    }
    if (status < 0)
        return unsupported();
    if (trace_size != 16 || memcmp(trace, ZERO, 16) == 0)
        return reject(o, trace, trace_size, span_id, span_size, parent_size, 0);
    if (span_size != 8 || memcmp(span_id, ZERO, 8) == 0)
        return reject(o, trace, trace_size, span_id, span_size, parent_size, 1);
    if (parent_size && parent_size != 8)
        return reject(o, trace, trace_size, span_id, span_size, parent_size, 2);
    if (kind < 0 || kind > 5) kind = 0;
    if (code < 0 || code > 2) code = 0;

    uint8_t core[CORE_SIZE];
    memcpy(core, span_id, 8);
    if (parent_size) memcpy(core + 8, parent, 8); else memset(core + 8, 0, 8);
    memcpy(core + 16, &start, 8);
    core[24] = (uint8_t)kind;
    core[25] = (uint8_t)code;
    core[26] = links ? 1 : 0;

    PyObject *trace_obj = NULL, *core_obj = NULL, *end_obj = NULL, *name_obj = NULL, *attrs = Py_None, *row = NULL;
    int rc = -1;
    if (!(trace_obj = PyBytes_FromStringAndSize((const char *)trace, 16))) goto done;
    if (!(core_obj = PyBytes_FromStringAndSize((const char *)core, CORE_SIZE))) goto done;
    if (!(end_obj = PyLong_FromUnsignedLongLong(end))) goto done;
    if (!(name_obj = clipped_interned(name, name_size, o->name_limit))) goto done;
    int needs_attrs = kind == KIND_CLIENT || kind == KIND_PRODUCER || kind == KIND_CONSUMER;
    if (needs_attrs && code != STATUS_ERROR) {
        /* StageAttributes' cache, read here; a miss or an error span goes to the caller */
        PyObject *kind_obj = PyLong_FromLong((long)kind); /* a cached small int */
        PyObject *key = kind_obj == NULL ? NULL : PyTuple_Pack(3, o->service, kind_obj, name_obj);
        Py_XDECREF(kind_obj);
        if (key == NULL) goto done;
        PyObject *known = PyDict_GetItemWithError(o->stages, key);
        Py_DECREF(key);
        if (known != NULL) {
            attrs = known;
            needs_attrs = 0;
        } else if (PyErr_Occurred()) {
            goto done;
        }
    }
    Py_INCREF(o->service);
    Py_INCREF(attrs);
    PyObject *values[] = {trace_obj, core_obj, end_obj, o->service, name_obj, attrs};
    trace_obj = core_obj = end_obj = name_obj = NULL; /* stolen by fill */
    row = fill(&row_slots, values);
    if (row == NULL || PyList_Append(o->rows, row) < 0) goto done;
    if (needs_attrs) {
        PyObject *item = Py_BuildValue("(nnnOllO)", o->resource_index, o->scope_index, o->span_index, row,
                                       (long)kind, (long)code, o->service);
        if (item == NULL) goto done;
        int appended = PyList_Append(o->pending, item);
        Py_DECREF(item);
        if (appended < 0) goto done;
    }
    rc = 0;
done:
    Py_XDECREF(trace_obj);
    Py_XDECREF(core_obj);
    Py_XDECREF(end_obj);
    Py_XDECREF(name_obj);
    Py_XDECREF(row);
    return rc;
}

static int resource_spans(Out *o, Reader r, PyObject *unknown_service) {
    const uint8_t *text = NULL;
    Py_ssize_t size = 0;
    int found = 0;
    if (resource_service(r, &text, &size, &found) < 0)
        return unsupported();
    if (text != NULL && size > 0) {
        o->service = clipped_interned(text, size, o->name_limit);
        if (o->service == NULL) return -1;
    } else {
        Py_INCREF(unknown_service);
        o->service = unknown_service;
    }
    Field f, sf;
    int status, s2, rc = 0;
    o->scope_index = 0;
    FOR_FIELDS(r, f, status) {
        if (f.field != 2 || f.wire != LEN)
            continue;
        Reader scope = READER(f);
        o->span_index = 0;
        FOR_FIELDS(scope, sf, s2) {
            if (sf.field != 2 || sf.wire != LEN)
                continue;
            if ((rc = span(o, READER(sf))) < 0)
                goto done;
            o->span_index++;
        }
        if (s2 < 0) { rc = unsupported(); goto done; }
        o->scope_index++;
    }
    if (status < 0) rc = unsupported();
done:
    Py_CLEAR(o->service);
    return rc;
}

PyDoc_STRVAR(decode_spans_doc,
"decode_spans(data, stages, name_limit, max_errors, unknown_service)\n"
"-> (rows, rejected, errors, pending)\n\n"
"``pending`` lists (resource, scope, span index, row, kind, status code, service) of the rows\n"
"whose kept attributes the caller must read (a stage not in ``stages`` yet, or an\n"
"error span). Raises Unsupported for a layout it does not walk.");

static PyObject *decode_spans(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    PyObject *stages, *unknown_service;
    Py_ssize_t name_limit, max_errors;
    if (row_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*O!nnU", &data, &PyDict_Type, &stages, &name_limit, &max_errors, &unknown_service))
        return NULL;
    Out o = {PyList_New(0), PyList_New(0), PyList_New(0), stages, NULL, name_limit, max_errors, 0, 0, 0, 0};
    PyObject *result = NULL;
    if (o.rows == NULL || o.errors == NULL || o.pending == NULL)
        goto done;
    Reader r = {data.buf, (const uint8_t *)data.buf + data.len};
    Field f;
    int status;
    FOR_FIELDS(r, f, status) {
        if (f.field != 1 || f.wire != LEN)
            continue;
        if (resource_spans(&o, READER(f), unknown_service) < 0)
            goto done;
        o.resource_index++;
    }
    if (status < 0) {
        unsupported();
        goto done;
    }
    result = Py_BuildValue("(OnOO)", o.rows, o.rejected, o.errors, o.pending);
done:
    Py_XDECREF(o.rows);
    Py_XDECREF(o.errors);
    Py_XDECREF(o.pending);
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(expand_doc,
"expand(rows) -> (spans, by_id, children, duplicates, root)\n\n"
"The Span objects of a decided trace's rows in arrival order (a repeated span id\n"
"after the first is skipped and counted), by span id, children by parent id,\n"
"and the parentless span that started first.");

static PyObject *expand(PyObject *Py_UNUSED(self), PyObject *rows) {
    if (span_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "expand() takes a list of rows");
        return NULL;
    }
    /* A copy holds a reference to every row while spans are made (which may run the GC). */
    PyObject *own = PyList_GetSlice(rows, 0, PyList_GET_SIZE(rows));
    PyObject *spans = PyList_New(0), *by_id = PyDict_New(), *children = PyDict_New(), *result = NULL;
    PyObject *root = Py_None;
    uint64_t root_start = 0;
    Py_ssize_t duplicates = 0;
    if (own == NULL || spans == NULL || by_id == NULL || children == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(own); i++) {
        PyObject *row = PyList_GET_ITEM(own, i);
        if (Py_TYPE(row) != row_slots.type) {
            PyErr_SetString(PyExc_TypeError, "expand() takes SpanRow objects");
            goto done;
        }
        PyObject *core = SLOT(row_slots, row, ROW_CORE);
        if (core == NULL || !PyBytes_Check(core) || PyBytes_GET_SIZE(core) != CORE_SIZE) {
            PyErr_SetString(PyExc_ValueError, "a SpanRow core must be 27 bytes");
            goto done;
        }
        const uint8_t *c = (const uint8_t *)PyBytes_AS_STRING(core);
        PyObject *span_id = PyBytes_FromStringAndSize((const char *)c, 8);
        if (span_id == NULL)
            goto done;
        int seen = PyDict_Contains(by_id, span_id);
        if (seen != 0) {
            Py_DECREF(span_id);
            if (seen < 0)
                goto done;
            duplicates++;
            continue;
        }
        int is_root = memcmp(c + 8, ZERO, 8) == 0;
        uint64_t start;
        memcpy(&start, c + 16, 8);
        PyObject *end = SLOT(row_slots, row, ROW_END), *service = SLOT(row_slots, row, ROW_SERVICE);
        PyObject *name = SLOT(row_slots, row, ROW_NAME), *attrs = SLOT(row_slots, row, ROW_ATTRS);
        if (end == NULL || service == NULL || name == NULL || attrs == NULL) {
            Py_DECREF(span_id);
            PyErr_SetString(PyExc_ValueError, "a SpanRow with an unset field");
            goto done;
        }
        int finished = 0;
        if (PyLong_Check(end)) {
            unsigned long long e = PyLong_AsUnsignedLongLong(end);
            if (e == (unsigned long long)-1 && PyErr_Occurred())
                PyErr_Clear(); /* negative: not finished (decoders never make one) */
            else
                finished = e > 0 && e >= start;
        }
        PyObject *parent = is_root ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((const char *)c + 8, 8);
        PyObject *start_obj = PyLong_FromUnsignedLongLong(start);
        PyObject *kind = PyLong_FromLong(c[24]), *status = PyLong_FromLong(c[25]);
        if (parent == NULL || start_obj == NULL || kind == NULL || status == NULL) {
            Py_DECREF(span_id);
            Py_XDECREF(parent);
            Py_XDECREF(start_obj);
            Py_XDECREF(kind);
            Py_XDECREF(status);
            goto done;
        }
        PyObject *values[] = {Py_NewRef(span_id), Py_NewRef(parent), start_obj, Py_NewRef(end), kind, status,
                              PyBool_FromLong(c[26] & 1), Py_NewRef(service), Py_NewRef(name), Py_NewRef(attrs),
                              PyBool_FromLong(finished)};
        PyObject *span = fill(&span_slots, values);
        int failed = span == NULL || PyList_Append(spans, span) < 0 || PyDict_SetItem(by_id, span_id, span) < 0;
        if (!failed && is_root) {
            if (root == Py_None || start < root_start) {
                root = span;
                root_start = start;
            }
        } else if (!failed) {
            PyObject *group = PyDict_GetItemWithError(children, parent);
            if (group == NULL) {
                group = PyErr_Occurred() ? NULL : PyList_New(0);
                failed = group == NULL || PyDict_SetItem(children, parent, group) < 0;
                Py_XDECREF(group); /* the dict holds it */
            }
            failed = failed || PyList_Append(group, span) < 0;
        }
        Py_DECREF(span_id);
        Py_DECREF(parent);
        Py_XDECREF(span); /* the list holds it */
        if (failed)
            goto done;
    }
    result = Py_BuildValue("(OOOnO)", spans, by_id, children, duplicates, root);
done:
    Py_XDECREF(own);
    Py_XDECREF(spans);
    Py_XDECREF(by_id);
    Py_XDECREF(children);
    return result;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(SpanRow, Span): the classes whose slots decode_spans and expand fill."},
    {"decode_spans", decode_spans, METH_VARARGS, decode_spans_doc},
    {"expand", expand, METH_O, expand_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rows", "Span rows in C: decode and expand.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__rows(void) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "the fast decoder assumes a little-endian host");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Unsupported = PyErr_NewException("traceguard._rows.Unsupported", PyExc_ValueError, NULL);
    if (Unsupported == NULL || PyModule_AddObject(m, "Unsupported", Unsupported) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    Py_INCREF(Unsupported);
    return m;
}
