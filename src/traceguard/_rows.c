/*
 * Span rows in C, the per-span hot paths:
 *
 * decode_spans: serialized ExportTraceServiceRequest / TracesData bytes ->
 * SpanRow objects, reading only the fields detection keeps; decode_logs, the
 * same for ExportLogsServiceRequest / LogsData -> LogRow objects.
 *
 * Two walks over the bytes. The first, certainly_valid, decides whether upb
 * would accept the message, from the message schema that bind() is given
 * (built from the installed descriptors, so it is the same schema upb uses):
 * wire format, UTF-8 of every known string field, every known sub-message,
 * down to any depth it walks. It only ever answers "certainly valid" or "not
 * shown": groups, packed fields, deep nesting, overlong keys are "not shown",
 * and so is every error; the caller then lets upb parse the bytes and decide,
 * so accept/reject decisions and their messages are always upb's.
 * The second walk reads the same values the reference decoders
 * (otlp_proto.decode_traces_message, decode_logs_message) read, with protobuf's merge rules: the
 * last occurrence of a scalar wins (a oneof member replaces the others),
 * repeated fields append, a field whose wire type does not match its
 * declaration is an unknown field. tests/test_rows.py checks both against upb
 * and the reference on the scenario's traffic, on edge cases, on randomly
 * mutated bytes and on messages generated from the schema.
 *
 * expand: a decided trace's rows -> Span objects and the indexes every
 * detector uses (assembler._expand_rows is the reference).
 *
 * self_times: each span's time minus what its children cover, which the
 * latency baselines and the forest read for every span of every trace
 * (models.features.span_self_times is the reference).
 *
 * decode_spans and expand build SpanRow and Span objects by filling their
 * __slots__ directly (offsets read from the classes' member descriptors by
 * bind()): running the Python __init__ per span cost as much as the rest of
 * the decode.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

static PyObject *Unsupported;

/* A class with __slots__, and the offsets of the slots in the order given to bind(). */
#define MAX_SLOTS 12
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset[MAX_SLOTS];
    int count;
} Slots;

static Slots row_slots, span_slots, log_slots;
static const char *LOG_SLOTS[] = {"trace_id", "span_id", "time", "severity_number", "severity_text", "body", "service",
                                  NULL};
static const char *ROW_SLOTS[] = {"trace_id", "core", "end", "service", "name", "attrs", "instance", NULL};
static const char *SPAN_SLOTS[] = {"span_id", "parent_span_id", "start", "end", "kind", "status", "has_links",
                                   "service", "name", "attrs", "finished", "instance", NULL};
enum { ROW_TRACE_ID, ROW_CORE, ROW_END, ROW_SERVICE, ROW_NAME, ROW_ATTRS, ROW_INSTANCE };

static int bind_slots(Slots *slots, PyObject *type, const char **names) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "bind() takes classes");
        return -1;
    }
    Py_ssize_t offsets[MAX_SLOTS];
    int i;
    for (i = 0; names[i] != NULL; i++) {
        if (i == MAX_SLOTS) {
            PyErr_SetString(PyExc_RuntimeError, "more slots than MAX_SLOTS");
            return -1;
        }
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

enum { VARINT = 0, I64 = 1, LEN = 2, I32 = 5 };
enum { KIND_SERVER = 2, KIND_CLIENT = 3, KIND_PRODUCER = 4, KIND_CONSUMER = 5, STATUS_ERROR = 2 };
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

/* The message schema, from the installed descriptors (native.py builds it). */
enum { TYPE_MESSAGE = 11, TYPE_STRING = 9, MAX_TYPE = 18 };
/* Wire type of each descriptor field type (FieldDescriptor.TYPE_*); 3 = groups. */
static const int8_t WIRE_OF_TYPE[MAX_TYPE + 1] = {-1, I64, I32, VARINT, VARINT, VARINT, I64, I32, VARINT, LEN, 3,
                                                  LEN, LEN, VARINT, VARINT, I32, I64, VARINT, VARINT};

typedef struct {
    uint8_t type;     /* 0: no such field in this message (an unknown field) */
    uint8_t repeated;
    uint8_t in_oneof;
    int32_t message;  /* schema index of a message field's type */
} FieldSpec;

typedef struct {
    FieldSpec *by_number; /* indexed by field number, up to size - 1 */
    uint32_t size;
} MessageSpec;

static MessageSpec *schema;
static Py_ssize_t schema_size;
static int any_value_message = -1;
/* Schema indexes of the two roots: traces (ExportTraceServiceRequest) and logs. */
enum { TRACES_ROOT = 0 };
static int logs_root = -1;

/* upb refuses more than 100 nested messages; real OTLP nests fewer than 12. */
#define MAX_WALKED_DEPTH 32

static void free_schema(void) {
    for (Py_ssize_t i = 0; i < schema_size; i++)
        PyMem_Free(schema[i].by_number);
    PyMem_Free(schema);
    schema = NULL;
    schema_size = 0;
}

/* schema: a list, one entry per message type (0 = ExportTraceServiceRequest), each a
 * list of (number, type, message index or -1, repeated, in a oneof). */
static int bind_schema(PyObject *messages) {
    if (!PyList_Check(messages)) {
        PyErr_SetString(PyExc_TypeError, "the schema must be a list");
        return -1;
    }
    free_schema();
    Py_ssize_t count = PyList_GET_SIZE(messages);
    schema = PyMem_Calloc(count ? count : 1, sizeof(MessageSpec));
    if (schema == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    schema_size = count;
    for (Py_ssize_t m = 0; m < count; m++) {
        PyObject *fields = PySequence_Fast(PyList_GET_ITEM(messages, m), "a message's fields must be a sequence");
        if (fields == NULL)
            goto fail;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(fields);
        unsigned long number, largest = 0;
        int type, child, repeated, in_oneof;
        for (int pass = 0; pass < 2; pass++) {
            for (Py_ssize_t i = 0; i < n; i++) {
                if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fields, i), "kiipp", &number, &type, &child, &repeated,
                                      &in_oneof))
                    goto fail_fields;
                if (number > (1ul << 29) || type < 1 || type > MAX_TYPE || child >= count ||
                    (type == TYPE_MESSAGE && child < 0)) {
                    PyErr_Format(PyExc_ValueError, "bad schema entry for field %lu", number);
                    goto fail_fields;
                }
                if (pass == 0) {
                    largest = number > largest ? number : largest;
                    continue;
                }
                schema[m].by_number[number] = (FieldSpec){(uint8_t)type, (uint8_t)repeated, (uint8_t)in_oneof, child};
            }
            if (pass == 0) {
                schema[m].size = (uint32_t)largest + 1;
                schema[m].by_number = PyMem_Calloc(largest + 1, sizeof(FieldSpec));
                if (schema[m].by_number == NULL) {
                    PyErr_NoMemory();
                    goto fail_fields;
                }
            }
        }
        Py_DECREF(fields);
        continue;
    fail_fields:
        Py_DECREF(fields);
        goto fail;
    }
    return 0;
fail:
    free_schema();
    return -1;
}

static const FieldSpec *field_spec(int message, uint32_t number) {
    const MessageSpec *spec = &schema[message];
    return number < spec->size && spec->by_number[number].type ? &spec->by_number[number] : NULL;
}

static int read_varint(const uint8_t **p, const uint8_t *end, int max_bytes, uint64_t *out) {
    uint64_t v = 0;
    for (int i = 0; i < max_bytes && *p < end; i++) {
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), as upb checks it. */
static int utf8_valid(const uint8_t *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if (!(word & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (len == 0 || n - i < len)
            return 0;
        for (int k = 1; k < len; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return 0;
        if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F) || (c == 0xF0 && s[i + 1] < 0x90) ||
            (c == 0xF4 && s[i + 1] > 0x8F))
            return 0;
        i += len;
    }
    return 1;
}

/* 1 when upb certainly accepts [p, end) as a message of this schema index; 0 when not shown. */
static int certainly_valid(const uint8_t *p, const uint8_t *end, int message, int depth) {
    while (p < end) {
        uint64_t key, value;
        if (!read_varint(&p, end, 5, &key) || key > UINT32_MAX || key >> 3 == 0)
            return 0;
        switch (key & 7) {
        case VARINT:
            if (!read_varint(&p, end, 10, &value))
                return 0;
            break;
        case I64:
            if (end - p < 8)
                return 0;
            p += 8;
            break;
        case I32:
            if (end - p < 4)
                return 0;
            p += 4;
            break;
        case LEN: {
            if (!read_varint(&p, end, 10, &value) || value > (uint64_t)(end - p))
                return 0;
            const uint8_t *data = p;
            p += value;
            const FieldSpec *field = field_spec(message, (uint32_t)(key >> 3));
            if (field == NULL) /* unknown field: only its framing counts */
                break;
            if (WIRE_OF_TYPE[field->type] != LEN) {
                if (field->repeated) /* packed numbers: not walked */
                    return 0;
                break; /* a wire type the field does not have: an unknown field */
            }
            if (field->type == TYPE_MESSAGE) {
                if (depth >= MAX_WALKED_DEPTH || !certainly_valid(data, p, field->message, depth + 1))
                    return 0;
            } else if (field->type == TYPE_STRING && !utf8_valid(data, (Py_ssize_t)value)) {
                return 0;
            }
            break;
        }
        default: /* groups, reserved wire types */
            return 0;
        }
    }
    return 1;
}

static PyObject *bind(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *row_type, *span_type, *log_type, *messages;
    int any_value, logs;
    if (!PyArg_ParseTuple(args, "OOOO!ii", &row_type, &span_type, &log_type, &PyList_Type, &messages, &any_value,
                          &logs))
        return NULL;
    if (bind_slots(&row_slots, row_type, ROW_SLOTS) < 0 || bind_slots(&span_slots, span_type, SPAN_SLOTS) < 0 ||
        bind_slots(&log_slots, log_type, LOG_SLOTS) < 0 || bind_schema(messages) < 0)
        return NULL;
    if (any_value < 0 || any_value >= schema_size || logs <= TRACES_ROOT || logs >= schema_size) {
        PyErr_SetString(PyExc_ValueError, "AnyValue or the logs root is not in the schema");
        free_schema();
        return NULL;
    }
    any_value_message = any_value;
    logs_root = logs;
    Py_RETURN_NONE;
}

static int unsupported(void) {
    PyErr_SetString(Unsupported, "message layout not handled by the fast decoder");
    return -1;
}

/* The string (a new reference, stolen; NULL passes through), cut to ``limit`` code
 * points: the reference's clip. */
static PyObject *clip(PyObject *s, Py_ssize_t limit) {
    if (s == NULL || PyUnicode_GET_LENGTH(s) <= limit)
        return s;
    PyObject *cut = PyUnicode_Substring(s, 0, limit);
    Py_DECREF(s);
    return cut;
}

static PyObject *clipped(const uint8_t *text, Py_ssize_t size, Py_ssize_t limit) {
    return clip(PyUnicode_DecodeUTF8((const char *)text, size, NULL), limit);
}

static PyObject *clipped_interned(const uint8_t *text, Py_ssize_t size, Py_ssize_t limit) {
    PyObject *s = clipped(text, size, limit);
    if (s != NULL)
        PyUnicode_InternInPlace(&s);
    return s;
}

/* AnyValue: its oneof member set last (merged over repeated occurrences: call it
 * once per occurrence with the same *member). member->field stays 0 if none is set. */
static int any_value_member(Reader r, Field *member) {
    Field f;
    int status;
    FOR_FIELDS(r, f, status) {
        const FieldSpec *field = field_spec(any_value_message, f.field);
        if (field != NULL && field->in_oneof && f.wire == WIRE_OF_TYPE[field->type])
            *member = f;
    }
    return status;
}

/* The Python value the reference decoder reads (AnyValue.WhichOneof, then that
 * member); array and kvlist values are messages there, so those are Unsupported. */
static PyObject *any_value_object(const Field *member, Py_ssize_t limit) {
    double number;
    switch (member->field) {
    case 0: Py_RETURN_NONE;
    case 1: return clipped(member->data, member->size, limit);
    case 2: return PyBool_FromLong(member->value != 0);
    case 3: return PyLong_FromLongLong((long long)member->value);
    case 4:
        memcpy(&number, &member->value, 8);
        return PyFloat_FromDouble(number);
    case 7: return PyBytes_FromStringAndSize((const char *)member->data, member->size);
    case 8: return PyLong_FromLong((long)(int32_t)member->value);
    default:
        unsupported();
        return NULL;
    }
}

/* A KeyValue: its key (last occurrence wins) and its value's oneof member (merged). */
static int key_value(Reader pair, const uint8_t **key, Py_ssize_t *key_size, Field *value) {
    Field kv;
    int status;
    FOR_FIELDS(pair, kv, status) {
        if (kv.field == 1 && kv.wire == LEN) {
            *key = kv.data;
            *key_size = kv.size;
        } else if (kv.field == 2 && kv.wire == LEN && any_value_member(READER(kv), value) < 0) {
            return -1;
        }
    }
    return status;
}

/* What a span's response-code attributes say: decode.common.response_status, whose
 * rule this follows (an UNSET status with a failing code reads as ERROR). */
typedef struct {
    int64_t http_max;                     /* the highest HTTP status code */
    int grpc_nonzero, grpc_server_failure; /* a gRPC code != 0; one of GRPC_SERVER_FAILURES */
} Response;

#define NO_RESPONSE ((Response){INT64_MIN, 0, 0})

/* 1 for an HTTP status code key, 2 for the gRPC one, 0 for any other key. */
static int response_key(const uint8_t *key, Py_ssize_t size) {
    if (size == 16 && memcmp(key, "http.status_code", 16) == 0) return 1;
    if (size == 25 && memcmp(key, "http.response.status_code", 25) == 0) return 1;
    if (size == 20 && memcmp(key, "rpc.grpc.status_code", 20) == 0) return 2;
    return 0;
}

/* A code written as a string: 1 to 18 ASCII decimal digits (str.isdigit over ASCII). */
static int digits_value(const uint8_t *text, Py_ssize_t size, int64_t *out) {
    if (size < 1 || size > 18)
        return 0;
    int64_t value = 0;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (text[i] < '0' || text[i] > '9')
            return 0;
        value = value * 10 + (text[i] - '0');
    }
    *out = value;
    return 1;
}

static void response_code(Response *r, int which, int64_t code) {
    if (which == 1) {
        if (code > r->http_max)
            r->http_max = code;
    } else {
        r->grpc_nonzero |= code != 0;
        r->grpc_server_failure |= code == 2 || code == 4 || (code >= 12 && code <= 15);
    }
}

static int response_failed(const Response *r, int kind) {
    if (kind == KIND_CLIENT)
        return r->http_max >= 400 || r->grpc_nonzero;
    return r->http_max >= 500 || r->grpc_server_failure;
}

/* Adds a span attribute (a KeyValue) to ``r`` if it is a response code. Its key
 * is read first (one pass over two fields): nearly every attribute is not one. */
static int proto_response_attribute(Reader pair, Response *r) {
    const Reader whole = pair;
    const uint8_t *key = NULL;
    Py_ssize_t key_size = 0;
    Field kv;
    int status;
    FOR_FIELDS(pair, kv, status) {
        if (kv.field == 1 && kv.wire == LEN) {
            key = kv.data;
            key_size = kv.size;
        }
    }
    int which = status < 0 ? 0 : response_key(key, key_size);
    if (which == 0)
        return status;
    Field value = {0};
    if (key_value(whole, &key, &key_size, &value) < 0)
        return -1;
    int64_t code;
    if (value.field == 3)
        code = (int64_t)value.value;
    else if (value.field == 8) /* an int32 member, as any_value_object reads it */
        code = (int32_t)value.value;
    else if (value.field != 1 || !digits_value(value.data, value.size, &code))
        return 0;
    response_code(r, which, code);
    return 0;
}

/* A resource attribute's string value; ``found`` once its key was seen. */
typedef struct {
    const uint8_t *text;
    Py_ssize_t size;
    int found;
} ResourceText;

static void resource_text(ResourceText *t, const Field *value) {
    t->found = 1;
    t->text = value->field == 1 ? value->data : NULL;
    t->size = value->field == 1 ? value->size : 0;
}

/* service.name, k8s.pod.name and service.instance.id of a ResourceSpans'
 * resource(s): the first KeyValue with each key. */
static int resource_names(Reader rs, ResourceText *service, ResourceText *pod, ResourceText *instance) {
    Field f, a;
    int status, s2;
    FOR_FIELDS(rs, f, status) {
        if (f.field != 1 || f.wire != LEN)
            continue;
        Reader resource = READER(f);
        FOR_FIELDS(resource, a, s2) {
            if (a.field != 1 || a.wire != LEN)
                continue;
            const uint8_t *key = NULL;
            Py_ssize_t key_size = 0;
            Field value = {0};
            if (key_value(READER(a), &key, &key_size, &value) < 0)
                return -1;
            if (key_size == 12 && !service->found && memcmp(key, "service.name", 12) == 0)
                resource_text(service, &value);
            else if (key_size == 12 && !pod->found && memcmp(key, "k8s.pod.name", 12) == 0)
                resource_text(pod, &value);
            else if (key_size == 19 && !instance->found && memcmp(key, "service.instance.id", 19) == 0)
                resource_text(instance, &value);
        }
        if (s2 < 0)
            return -1;
    }
    return status;
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
    PyObject *rows, *errors, *pending, *stages, *kept_keys, *service;
    PyObject *instance; /* the resource's pod (k8s.pod.name, else service.instance.id) or None */
    Py_ssize_t name_limit, value_limit, max_errors, rejected;
    PyObject *evented; /* (row, the span's message bytes or JSON object) of the spans that have events */
} Out;

/* Lists the row just added with its span's ``source`` (a new reference, stolen),
 * whose events the caller turns into log records. */
static int add_evented(Out *o, PyObject *source) {
    if (source == NULL)
        return -1;
    PyObject *item = PyTuple_Pack(2, PyList_GET_ITEM(o->rows, PyList_GET_SIZE(o->rows) - 1), source);
    Py_DECREF(source);
    int rc = item == NULL ? -1 : PyList_Append(o->evented, item);
    Py_XDECREF(item);
    return rc;
}

/* Keeps a rejection's message (a new reference, stolen; NULL: an error is set). */
static int keep_error(Out *o, PyObject *message) {
    if (message == NULL)
        return -1;
    int rc = PyList_Append(o->errors, message);
    Py_DECREF(message);
    return rc;
}

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
    return keep_error(o, message);
}

static const uint8_t ZERO[16];

/* The span's attributes whose key is kept, as [(key, value)] in their order
 * (otlp_proto._kept_attributes); a repeated key or value field is merged as upb merges it. */
/* Whether ``pairs`` (key, value) already holds ``key``: a key sent again is not kept
 * again (OTLP keys are unique; a span that repeats one 190k times must not cost 190k pairs). */
static int has_key(PyObject *pairs, PyObject *key) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(pairs); i++) {
        int same = PyUnicode_Compare(PyTuple_GET_ITEM(PyList_GET_ITEM(pairs, i), 0), key);
        if (same == 0)
            return 1;
        if (same == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *proto_kept_attributes(Out *o, const void *source) {
    Reader r = *(const Reader *)source;
    PyObject *pairs = PyList_New(0);
    Field f;
    int status;
    FOR_FIELDS(r, f, status) {
        if (pairs == NULL)
            return NULL;
        if (f.field != 9 || f.wire != LEN)
            continue;
        const uint8_t *key = (const uint8_t *)"";
        Py_ssize_t key_size = 0;
        Field value = {0};
        int s2 = key_value(READER(f), &key, &key_size, &value);
        PyObject *key_obj = s2 < 0 ? NULL : PyUnicode_DecodeUTF8((const char *)key, key_size, NULL);
        int keep = key_obj == NULL ? -1 : PySet_Contains(o->kept_keys, key_obj);
        if (keep > 0) {
            int seen = has_key(pairs, key_obj);
            keep = seen < 0 ? -1 : !seen;
        }
        PyObject *item = NULL, *value_obj = NULL;
        if (keep > 0 && (value_obj = any_value_object(&value, o->value_limit)) != NULL &&
            (item = PyTuple_Pack(2, key_obj, value_obj)) != NULL && PyList_Append(pairs, item) < 0)
            Py_CLEAR(item);
        int failed = s2 < 0 || keep < 0 || (keep > 0 && item == NULL);
        Py_XDECREF(key_obj);
        Py_XDECREF(value_obj);
        Py_XDECREF(item);
        if (failed) {
            if (s2 < 0)
                unsupported();
            Py_CLEAR(pairs);
            return NULL;
        }
    }
    if (status < 0) {
        Py_XDECREF(pairs);
        unsupported();
        return NULL;
    }
    return pairs;
}

/* Reads the kept attributes of the span at ``source`` (a protobuf Reader or a JSON dict). */
typedef PyObject *(*KeptReader)(Out *o, const void *source);

/* Appends the SpanRow; its attributes come from the stage cache, or, for a stage
 * not cached yet or an error span, go to ``pending`` with the kept attributes read
 * by ``read``, for the caller's StageAttributes. Steals ``name_obj``. */
static int add_row(Out *o, const uint8_t *trace, const uint8_t *core, uint64_t end, PyObject *name_obj,
                   KeptReader read, const void *source) {
    int kind = core[24], code = core[25];
    PyObject *trace_obj = NULL, *core_obj = NULL, *end_obj = NULL, *attrs = Py_None, *row = NULL;
    int rc = -1;
    if (!(trace_obj = PyBytes_FromStringAndSize((const char *)trace, 16))) goto done;
    if (!(core_obj = PyBytes_FromStringAndSize((const char *)core, CORE_SIZE))) goto done;
    if (!(end_obj = PyLong_FromUnsignedLongLong(end))) goto done;
    int needs_attrs = kind == KIND_CLIENT || kind == KIND_PRODUCER || kind == KIND_CONSUMER;
    if (needs_attrs && code != STATUS_ERROR) {
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
    PyObject *values[] = {trace_obj, core_obj, end_obj, o->service, name_obj, attrs, Py_NewRef(o->instance)};
    trace_obj = core_obj = end_obj = name_obj = NULL; /* stolen by fill */
    row = fill(&row_slots, values);
    if (row == NULL || PyList_Append(o->rows, row) < 0) goto done;
    /* A row holds bytes, an int, strings and a tuple of pairs: it cannot be in a
     * reference cycle, so the cyclic GC need not walk it. Rows are most of what a
     * live receiver holds in flight, and each full collection walked them all. */
    PyObject_GC_UnTrack(row);
    if (needs_attrs) {
        PyObject *pairs = read(o, source);
        if (pairs == NULL) goto done;
        PyObject *item = Py_BuildValue("(OiiON)", row, kind, code, o->service, pairs);
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

static int span(Out *o, Reader r) {
    const Reader whole = r;
    const uint8_t *trace = NULL, *span_id = NULL, *parent = NULL, *name = (const uint8_t *)"";
    Py_ssize_t trace_size = 0, span_size = 0, parent_size = 0, name_size = 0;
    uint64_t start = 0, end = 0;
    int64_t kind = 0, code = 0;
    int links = 0, events = 0;
    Response response = NO_RESPONSE;
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
        case 9:
            if (f.wire == LEN && proto_response_attribute(READER(f), &response) < 0)
                return unsupported();
            break;
        case 11: if (f.wire == LEN) events = 1; break;
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
    if (code == 0 && response_failed(&response, (int)kind)) code = STATUS_ERROR;

    uint8_t core[CORE_SIZE];
    memcpy(core, span_id, 8);
    if (parent_size) memcpy(core + 8, parent, 8); else memset(core + 8, 0, 8);
    memcpy(core + 16, &start, 8);
    core[24] = (uint8_t)kind;
    core[25] = (uint8_t)code;
    core[26] = links ? 1 : 0;

    PyObject *name_obj = clipped_interned(name, name_size, o->name_limit);
    if (name_obj == NULL)
        return -1;
    if (add_row(o, trace, core, end, name_obj, proto_kept_attributes, &whole) < 0)
        return -1;
    return events ? add_evented(o, PyBytes_FromStringAndSize((const char *)whole.p, whole.end - whole.p)) : 0;
}

/* A resource's name: its text, clipped and interned, else ``fallback``. */
static PyObject *resource_name(const ResourceText *t, Py_ssize_t limit, PyObject *fallback) {
    if (t->text != NULL && t->size > 0)
        return clipped_interned(t->text, t->size, limit);
    return Py_NewRef(fallback);
}

/* Reads one Span or LogRecord into ``o``. */
typedef int (*ItemReader)(Out *o, Reader r);

/* A ResourceSpans or ResourceLogs: they nest alike (1: the resource, 2: scopes, whose
 * field 2 holds the items), so one walk serves both, with the resource's service and
 * pod set on ``o`` while its items are read. */
static int resource_items(Out *o, Reader r, PyObject *unknown_service, ItemReader item) {
    ResourceText service = {0}, pod = {0}, instance = {0};
    if (resource_names(r, &service, &pod, &instance) < 0)
        return unsupported();
    if ((o->service = resource_name(&service, o->name_limit, unknown_service)) == NULL)
        return -1;
    o->instance = resource_name(pod.text != NULL && pod.size > 0 ? &pod : &instance, o->name_limit, Py_None);
    if (o->instance == NULL) {
        Py_CLEAR(o->service);
        return -1;
    }
    Field f, sf;
    int status, s2, rc = 0;
    FOR_FIELDS(r, f, status) {
        if (f.field != 2 || f.wire != LEN)
            continue;
        Reader scope = READER(f);
        FOR_FIELDS(scope, sf, s2) {
            if (sf.field != 2 || sf.wire != LEN)
                continue;
            if ((rc = item(o, READER(sf))) < 0)
                goto done;
        }
        if (s2 < 0) { rc = unsupported(); goto done; }
    }
    if (status < 0) rc = unsupported();
done:
    Py_CLEAR(o->service);
    Py_CLEAR(o->instance);
    return rc;
}

/* Every item of a request (field 1: its ResourceSpans / ResourceLogs). */
static int request_items(Out *o, const Py_buffer *data, PyObject *unknown_service, ItemReader item) {
    Reader r = {data->buf, (const uint8_t *)data->buf + data->len};
    Field f;
    int status;
    FOR_FIELDS(r, f, status) {
        if (f.field == 1 && f.wire == LEN && resource_items(o, READER(f), unknown_service, item) < 0)
            return -1;
    }
    return status < 0 ? unsupported() : 0;
}

PyDoc_STRVAR(decode_spans_doc,
"decode_spans(data, stages, kept_keys, name_limit, value_limit, max_errors, unknown_service)\n"
"-> (rows, rejected, errors, pending, evented)\n\n"
"``evented`` lists (row, the span's message bytes) of the spans that have events.\n"
"``pending`` lists (row, kind, status code, service, kept attributes) of the rows whose\n"
"attributes the stage cache ``stages`` does not give (a stage not in it yet, or an error\n"
"span); the kept attributes are [(key, value)] of the keys in ``kept_keys``. Raises\n"
"Unsupported for bytes it cannot show to be valid protobuf (upb must decide) or a layout\n"
"it does not walk.");

static PyObject *decode_spans(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    PyObject *stages, *kept_keys, *unknown_service;
    Py_ssize_t name_limit, value_limit, max_errors;
    if (row_slots.type == NULL || schema == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*O!O!nnnU", &data, &PyDict_Type, &stages, &PyFrozenSet_Type, &kept_keys,
                          &name_limit, &value_limit, &max_errors, &unknown_service))
        return NULL;
    if (!certainly_valid(data.buf, (const uint8_t *)data.buf + data.len, TRACES_ROOT, 0)) {
        PyErr_SetString(Unsupported, "not shown to be valid here: upb decides");
        PyBuffer_Release(&data);
        return NULL;
    }
    Out o = {PyList_New(0), PyList_New(0), PyList_New(0), stages, kept_keys, NULL, NULL, name_limit, value_limit,
             max_errors, 0, PyList_New(0)};
    PyObject *result = NULL;
    if (o.rows == NULL || o.errors == NULL || o.pending == NULL || o.evented == NULL)
        goto done;
    if (request_items(&o, &data, unknown_service, span) < 0)
        goto done;
    result = Py_BuildValue("(OnOOO)", o.rows, o.rejected, o.errors, o.pending, o.evented);
done:
    Py_XDECREF(o.rows);
    Py_XDECREF(o.errors);
    Py_XDECREF(o.pending);
    Py_XDECREF(o.evented);
    PyBuffer_Release(&data);
    return result;
}

/* A log body as the reference reads it: a string clipped; any other value str() of
 * it when it is truthy, else "", then clipped. */
static PyObject *log_body(const Field *member, Py_ssize_t limit) {
    if (member->field == 1)
        return clipped(member->data, member->size, limit);
    PyObject *value = any_value_object(member, limit);
    if (value == NULL)
        return NULL;
    int truthy = PyObject_IsTrue(value);
    PyObject *text = truthy < 0 ? NULL : truthy ? PyObject_Str(value) : PyUnicode_New(0, 0);
    Py_DECREF(value);
    return clip(text, limit);
}

/* One LogRecord -> a LogRow (otlp_proto.decode_logs_message is the reference). */
static int log_record(Out *o, Reader r) {
    const uint8_t *trace = NULL, *span_id = NULL, *text = (const uint8_t *)"";
    Py_ssize_t trace_size = 0, span_size = 0, text_size = 0;
    uint64_t time = 0, observed = 0;
    int32_t severity = 0;
    Field body = {0}, f;
    int status;
    FOR_FIELDS(r, f, status) {
        switch (f.field) {
        case 1: if (f.wire == I64) time = f.value; break;
        case 2: if (f.wire == VARINT) severity = (int32_t)f.value; break;
        case 3: if (f.wire == LEN) { text = f.data; text_size = f.size; } break;
        case 5: if (f.wire == LEN && any_value_member(READER(f), &body) < 0) return unsupported(); break;
        case 9: if (f.wire == LEN) { trace = f.data; trace_size = f.size; } break;
        case 10: if (f.wire == LEN) { span_id = f.data; span_size = f.size; } break;
        case 11: if (f.wire == I64) observed = f.value; break;
        }
    }
    if (status < 0)
        return unsupported();
    if (trace_size == 0)
        return 0; /* nothing to link it to: skipped, not rejected */
    if (trace_size != 16 || (span_size && span_size != 8)) {
        o->rejected++;
        if (PyList_GET_SIZE(o->errors) >= o->max_errors)
            return 0;
        if (trace_size != 16)
            return keep_error(o, PyUnicode_FromFormat("log record: trace_id must be 16 bytes, got %zd", trace_size));
        char a[2 * 16 + 1];
        hex(a, trace, 16);
        return keep_error(o, PyUnicode_FromFormat("log record of trace %s: span_id must be 8 bytes, got %zd", a,
                                                  span_size));
    }
    PyObject *values[7] = {
        PyBytes_FromStringAndSize((const char *)trace, 16),
        span_size ? PyBytes_FromStringAndSize((const char *)span_id, 8) : Py_NewRef(Py_None),
        PyLong_FromUnsignedLongLong(time ? time : observed),
        PyLong_FromLong(severity),
        PyUnicode_DecodeUTF8((const char *)text, text_size, NULL),
        log_body(&body, o->value_limit),
        Py_NewRef(o->service),
    };
    for (int i = 0; i < 7; i++) {
        if (values[i] == NULL) {
            for (int k = 0; k < 7; k++)
                Py_XDECREF(values[k]);
            return -1;
        }
    }
    PyObject *row = fill(&log_slots, values);
    if (row == NULL)
        return -1;
    PyObject_GC_UnTrack(row); /* bytes, ints and strings: no cycles (as add_row's span rows) */
    int rc = PyList_Append(o->rows, row);
    Py_DECREF(row);
    return rc;
}

PyDoc_STRVAR(decode_logs_doc,
"decode_logs(data, name_limit, body_limit, max_errors, unknown_service) -> (rows, rejected, errors)\n\n"
"The LogRow of each log record with a trace id in a serialized ExportLogsServiceRequest /\n"
"LogsData. Raises Unsupported for bytes it cannot show to be valid protobuf (upb must\n"
"decide) or a layout it does not walk (a body that is an array or a key-value list).");

static PyObject *decode_logs(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data;
    PyObject *unknown_service;
    Py_ssize_t name_limit, body_limit, max_errors;
    if (log_slots.type == NULL || schema == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*nnnU", &data, &name_limit, &body_limit, &max_errors, &unknown_service))
        return NULL;
    PyObject *result = NULL;
    Out o = {.rows = PyList_New(0), .errors = PyList_New(0), .name_limit = name_limit, .value_limit = body_limit,
             .max_errors = max_errors};
    if (o.rows == NULL || o.errors == NULL)
        goto done;
    if (!certainly_valid(data.buf, (const uint8_t *)data.buf + data.len, logs_root, 0)) {
        PyErr_SetString(Unsupported, "not shown to be valid here: upb decides");
        goto done;
    }
    if (request_items(&o, &data, unknown_service, log_record) == 0)
        result = Py_BuildValue("(OnO)", o.rows, o.rejected, o.errors);
done:
    Py_XDECREF(o.rows);
    Py_XDECREF(o.errors);
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(expand_doc,
"expand(rows) -> (spans, by_id, children, orphans, duplicates, root, stages, failed)\n\n"
"The Span objects of a decided trace's rows in arrival order (a repeated span id\n"
"after the first is skipped and counted), by span id, children by parent id,\n"
"the spans whose parent is not in the trace, the parentless span that started first,\n"
"each span's (service, name, kind) and the spans with status ERROR.\n\n"
"A stage tuple is the same object for every span of that stage (up to\n"
"STAGE_CACHE stages, then the cache starts again): stage-keyed dicts then find\n"
"their key by identity instead of comparing tuples, in every detector.");

#define STAGE_CACHE 65536
#define STAGE_SLOTS (2 * STAGE_CACHE) /* a power of two: open addressing, at most half full */

/* Stages by the identity of their service and name strings, which the decoders
 * intern: a slot's tuple holds both strings, so their addresses cannot be taken
 * by other objects while the slot lives. An equal name that is not the same
 * object only makes another tuple (still equal). */
typedef struct {
    PyObject *service, *name, *tuple;
    long kind;
} StageSlot;

static StageSlot *stage_slots = NULL;
static Py_ssize_t stage_count = 0;

static size_t stage_slot(PyObject *service, PyObject *name, long kind) {
    uint64_t h = ((uint64_t)(uintptr_t)service >> 4) * 0x9E3779B97F4A7C15ull;
    h ^= ((uint64_t)(uintptr_t)name >> 4) * 0xC2B2AE3D27D4EB4Full ^ (uint64_t)kind;
    size_t i = (size_t)(h ^ (h >> 29)) & (STAGE_SLOTS - 1);
    while (stage_slots[i].tuple != NULL
           && !(stage_slots[i].service == service && stage_slots[i].name == name && stage_slots[i].kind == kind))
        i = (i + 1) & (STAGE_SLOTS - 1);
    return i;
}

/* The one tuple of a stage (a new reference); the cache starts again when full. */
static PyObject *interned_stage(PyObject *service, PyObject *name, PyObject *kind_obj, long kind) {
    if (stage_slots == NULL && (stage_slots = PyMem_Calloc(STAGE_SLOTS, sizeof(StageSlot))) == NULL)
        return PyErr_NoMemory();
    size_t i = stage_slot(service, name, kind);
    if (stage_slots[i].tuple != NULL)
        return Py_NewRef(stage_slots[i].tuple);
    PyObject *stage = PyTuple_Pack(3, service, name, kind_obj);
    if (stage == NULL)
        return NULL;
    if (stage_count >= STAGE_CACHE) {
        StageSlot *old = stage_slots;
        if ((stage_slots = PyMem_Calloc(STAGE_SLOTS, sizeof(StageSlot))) == NULL) {
            stage_slots = old;
            Py_DECREF(stage);
            return PyErr_NoMemory();
        }
        for (size_t j = 0; j < STAGE_SLOTS; j++)
            Py_XDECREF(old[j].tuple);
        PyMem_Free(old);
        stage_count = 0;
        i = stage_slot(service, name, kind);
    }
    stage_slots[i] = (StageSlot){service, name, Py_NewRef(stage), kind};
    stage_count++;
    return stage;
}

enum { SPAN_ID = 0, SPAN_PARENT = 1, SPAN_START = 2, SPAN_END = 3, SPAN_KIND = 4, SPAN_HAS_LINKS = 6, SPAN_FINISHED = 10 };

/* A finished span's start and end (finished() checked it is a Span); Unsupported
 * for what no decoder makes (an end before the start, times outside 64 bits): the
 * reference decides. */
static int span_interval(PyObject *span, uint64_t *start, uint64_t *end) {
    PyObject *start_obj = SLOT(span_slots, span, SPAN_START), *end_obj = SLOT(span_slots, span, SPAN_END);
    if (start_obj == NULL || end_obj == NULL || !PyLong_Check(start_obj) || !PyLong_Check(end_obj)) {
        PyErr_SetString(Unsupported, "a Span without integer times");
        return -1;
    }
    *start = PyLong_AsUnsignedLongLong(start_obj);
    *end = PyLong_AsUnsignedLongLong(end_obj);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(Unsupported, "a time outside 64 bits");
        return -1;
    }
    if (*end < *start) {
        PyErr_SetString(Unsupported, "a finished span that ends before it starts");
        return -1;
    }
    return 0;
}

static int finished(PyObject *span) {
    if (Py_TYPE(span) != span_slots.type) {
        PyErr_SetString(Unsupported, "not a Span");
        return -1;
    }
    return SLOT(span_slots, span, SPAN_FINISHED) == Py_True;
}

static int by_interval(const void *a, const void *b) {
    const uint64_t *x = a, *y = b;
    return x[0] != y[0] ? (x[0] < y[0] ? -1 : 1) : (x[1] != y[1] ? (x[1] < y[1] ? -1 : 1) : 0);
}

PyDoc_STRVAR(self_times_doc,
"self_times(spans, children) -> [int | None, ...]\n\n"
"Each span's duration minus what its finished children (children: by parent\n"
"span id) cover within it, None if it is unfinished: models.features.span_self_times,\n"
"the reference, in unsigned 64-bit arithmetic (every value lies between the span's\n"
"start and end). Raises Unsupported for spans no decoder makes.");

static PyObject *self_times(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *spans, *children;
    if (span_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &spans, &PyDict_Type, &children))
        return NULL;
    const Py_ssize_t count = PyList_GET_SIZE(spans);
    PyObject *out = PyList_New(count);
    uint64_t *pairs = NULL; /* (clipped start, clipped end) of a span's finished children */
    Py_ssize_t room = 0;
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *span = PyList_GET_ITEM(spans, i), *value;
        uint64_t start, end;
        int done = finished(span);
        if (done < 0)
            goto fail;
        if (!done) {
            PyList_SET_ITEM(out, i, Py_NewRef(Py_None));
            continue;
        }
        if (span_interval(span, &start, &end) < 0)
            goto fail;
        PyObject *span_id = SLOT(span_slots, span, SPAN_ID);
        PyObject *kids = span_id == NULL ? NULL : PyDict_GetItemWithError(children, span_id);
        if (kids == NULL && PyErr_Occurred())
            goto fail;
        if (kids != NULL && !PyList_Check(kids)) {
            PyErr_SetString(Unsupported, "children that are not a list");
            goto fail;
        }
        const Py_ssize_t n = kids == NULL ? 0 : PyList_GET_SIZE(kids);
        if (n > room) {
            uint64_t *grown = PyMem_Realloc(pairs, (size_t)n * 2 * sizeof(uint64_t));
            if (grown == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            pairs = grown;
            room = n;
        }
        Py_ssize_t used = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *kid = PyList_GET_ITEM(kids, k);
            uint64_t kid_start, kid_end;
            int kid_done = finished(kid);
            if (kid_done < 0)
                goto fail;
            if (!kid_done)
                continue;
            if (span_interval(kid, &kid_start, &kid_end) < 0)
                goto fail;
            pairs[2 * used] = kid_start > start ? kid_start : start;
            pairs[2 * used + 1] = kid_end < end ? kid_end : end;
            used++;
        }
        if (used > 1)
            qsort(pairs, (size_t)used, 2 * sizeof(uint64_t), by_interval);
        uint64_t covered = 0, cursor = start;
        for (Py_ssize_t k = 0; k < used; k++) {
            const uint64_t from = pairs[2 * k], to = pairs[2 * k + 1];
            if (to <= cursor || from >= to)
                continue; /* nothing left of it within the span */
            covered += to - (from > cursor ? from : cursor);
            cursor = to;
        }
        if ((value = PyLong_FromUnsignedLongLong(end - start - covered)) == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, value);
    }
    PyMem_Free(pairs);
    return out;
fail:
    PyMem_Free(pairs);
    Py_DECREF(out);
    return NULL;
}

enum { SPAN_SERVICE = 7, SPAN_NAME = 8, KIND_NETWORK = 6 };
#define SMALL_GROUP 32 /* children compared pairwise up to this many; a dict counts larger groups */

/* A span's kind; -1 with Unsupported for a kind that is not an int. */
static int span_kind(PyObject *span, long *kind) {
    PyObject *value = SLOT(span_slots, span, SPAN_KIND);
    if (value == NULL || !PyLong_Check(value)) {
        PyErr_SetString(Unsupported, "a Span without an integer kind");
        return -1;
    }
    *kind = PyLong_AsLong(value);
    if (*kind == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        *kind = -2; /* no kind this code knows */
    }
    return 0;
}

/* A span's children list (borrowed, NULL for none); -1 on error. */
static int children_of(PyObject *span, PyObject *children, PyObject **kids) {
    PyObject *span_id = SLOT(span_slots, span, SPAN_ID);
    *kids = span_id == NULL ? NULL : PyDict_GetItemWithError(children, span_id);
    if (*kids == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyList_Check(*kids)) {
        PyErr_SetString(Unsupported, "children that are not a list");
        return -1;
    }
    return 0;
}

/* The callee (borrowed, NULL for none) of a finished CLIENT span, as
 * models.features.callee_of finds it: its first finished SERVER child in
 * another service. 0 when the span is no finished CLIENT; -1 on error. */
static int client_callee(PyObject *span, PyObject *children, PyObject **callee) {
    long kind;
    PyObject *kids;
    *callee = NULL;
    int done = finished(span);
    if (done < 0 || span_kind(span, &kind) < 0)
        return -1;
    if (kind != KIND_CLIENT || !done)
        return 0;
    if (children_of(span, children, &kids) < 0)
        return -1;
    PyObject *service = SLOT(span_slots, span, SPAN_SERVICE);
    for (Py_ssize_t k = 0; kids != NULL && k < PyList_GET_SIZE(kids); k++) {
        PyObject *kid = PyList_GET_ITEM(kids, k);
        long kid_kind;
        int kid_done = finished(kid);
        if (kid_done < 0 || span_kind(kid, &kid_kind) < 0)
            return -1;
        if (kid_kind != KIND_SERVER || !kid_done)
            continue;
        PyObject *kid_service = SLOT(span_slots, kid, SPAN_SERVICE);
        int other = service == NULL || kid_service == NULL ? -1 : PyObject_RichCompareBool(kid_service, service, Py_NE);
        if (other < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(Unsupported, "a Span without a service");
            return -1;
        }
        if (other) {
            *callee = kid;
            return 0;
        }
    }
    return 0;
}

/* A call's entry in place of its client span's own (a new reference, NULL on error). */
typedef PyObject *(*CallValue)(PyObject *span, PyObject *callee);

/* The callee's network stage: (callee service, '<operation> <- <caller service>', KIND_NETWORK). */
static PyObject *network_key(PyObject *span, PyObject *callee) {
    PyObject *operation = SLOT(span_slots, callee, SPAN_NAME), *caller = SLOT(span_slots, span, SPAN_SERVICE);
    if (operation == NULL || !PyUnicode_CheckExact(operation) || caller == NULL || !PyUnicode_CheckExact(caller)) {
        PyErr_SetString(Unsupported, "a name or service that is not a str");
        return NULL;
    }
    PyObject *name = PyUnicode_FromFormat("%U <- %U", operation, caller);
    PyObject *kind = PyLong_FromLong(KIND_NETWORK);
    PyObject *stage = name == NULL || kind == NULL ? NULL
                                                   : PyTuple_Pack(3, SLOT(span_slots, callee, SPAN_SERVICE), name, kind);
    Py_XDECREF(name);
    Py_XDECREF(kind);
    return stage;
}

/* The client's duration less its callee's, 0 if that is negative. */
static PyObject *network_sample(PyObject *span, PyObject *callee) {
    uint64_t start, end, callee_start, callee_end;
    if (span_interval(span, &start, &end) < 0 || span_interval(callee, &callee_start, &callee_end) < 0)
        return NULL;
    const uint64_t own = end - start, callee_ns = callee_end - callee_start;
    return PyLong_FromUnsignedLongLong(own > callee_ns ? own - callee_ns : 0);
}

/* (spans, children, values): ``values`` with the entry of each finished CLIENT span
 * whose callee is in the trace made by ``value_of``, in a copy; ``values`` itself
 * when there is no such span. models.features._calls and _replaced. */
static PyObject *at_calls(PyObject *args, CallValue value_of) {
    PyObject *spans, *children, *values, *out = NULL;
    if (span_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &spans, &PyDict_Type, &children, &PyList_Type, &values))
        return NULL;
    const Py_ssize_t count = PyList_GET_SIZE(spans);
    if (PyList_GET_SIZE(values) != count) {
        PyErr_SetString(Unsupported, "values not aligned with the spans");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *span = PyList_GET_ITEM(spans, i), *callee, *value;
        if (client_callee(span, children, &callee) < 0)
            goto fail;
        if (callee == NULL)
            continue;
        if ((value = value_of(span, callee)) == NULL)
            goto fail;
        if (out == NULL && (out = PyList_GetSlice(values, 0, count)) == NULL) {
            Py_DECREF(value);
            goto fail;
        }
        PyList_SetItem(out, i, value); /* steals value, drops the span's own */
    }
    return out != NULL ? out : Py_NewRef(values);
fail:
    Py_XDECREF(out);
    return NULL;
}

PyDoc_STRVAR(latency_keys_doc,
"latency_keys(spans, children, stages) -> [stage, ...]\n\n"
"models.features.latency_keys, the reference: each span's stage, except a finished\n"
"CLIENT span with its callee in the trace, whose key is the callee's network stage\n"
"(callee service, '<operation> <- <caller service>', KIND_NETWORK). ``stages``\n"
"itself when no span has a callee. Raises Unsupported for spans no decoder makes.");

static PyObject *latency_keys(PyObject *Py_UNUSED(self), PyObject *args) {
    return at_calls(args, network_key);
}

PyDoc_STRVAR(latency_samples_doc,
"latency_samples(spans, children, self_times) -> [int | None, ...]\n\n"
"models.features.latency_samples, the reference: each span's self time, except a\n"
"finished CLIENT span with its callee in the trace, whose sample is its duration\n"
"less the callee's (0 if that is negative). ``self_times`` itself when no span\n"
"has a callee. Raises Unsupported for spans no decoder makes.");

static PyObject *latency_samples(PyObject *Py_UNUSED(self), PyObject *args) {
    return at_calls(args, network_sample);
}

/* How often the commonest (service, name) occurs among a group's spans. */
static Py_ssize_t most_repeated(PyObject *kids) {
    const Py_ssize_t n = PyList_GET_SIZE(kids);
    Py_ssize_t most = 0;
    if (n <= SMALL_GROUP) {
        for (Py_ssize_t a = 0; a < n; a++) {
            PyObject *x = PyList_GET_ITEM(kids, a);
            Py_ssize_t same = 1;
            for (Py_ssize_t b = a + 1; b < n; b++) {
                PyObject *y = PyList_GET_ITEM(kids, b);
                int eq = PyObject_RichCompareBool(SLOT(span_slots, x, SPAN_SERVICE), SLOT(span_slots, y, SPAN_SERVICE),
                                                  Py_EQ);
                if (eq > 0)
                    eq = PyObject_RichCompareBool(SLOT(span_slots, x, SPAN_NAME), SLOT(span_slots, y, SPAN_NAME), Py_EQ);
                if (eq < 0)
                    return -1;
                same += eq;
            }
            if (same > most)
                most = same;
        }
        return most;
    }
    PyObject *counts = PyDict_New();
    if (counts == NULL)
        return -1;
    for (Py_ssize_t a = 0; a < n; a++) {
        PyObject *x = PyList_GET_ITEM(kids, a);
        PyObject *key = PyTuple_Pack(2, SLOT(span_slots, x, SPAN_SERVICE), SLOT(span_slots, x, SPAN_NAME));
        PyObject *seen = key == NULL ? NULL : PyDict_GetItemWithError(counts, key);
        Py_ssize_t now = seen == NULL ? 1 : PyLong_AsSsize_t(seen) + 1;
        PyObject *value = key == NULL || (seen == NULL && PyErr_Occurred()) ? NULL : PyLong_FromSsize_t(now);
        int failed = value == NULL || PyDict_SetItem(counts, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(counts);
            return -1;
        }
        if (now > most)
            most = now;
    }
    Py_DECREF(counts);
    return most;
}

PyDoc_STRVAR(shape_doc,
"shape(root, spans, children) -> (depth, max_fan_out, services, max_repeated_calls)\n\n"
"The counts of models.features.shape, the reference: levels below and with the\n"
"root (0 without one), the most children of one parent, distinct services, and\n"
"the most calls of one (service, name) under one parent (0 when no parent has\n"
"two children). Raises Unsupported for spans no decoder makes.");

static PyObject *shape(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *root, *spans, *children, *group, *key, *services = NULL, *result = NULL;
    PyObject **frontier = NULL, **next = NULL;
    Py_ssize_t depth = 0, fan_out = 0, repeated = 0, grouped = 0, position = 0;
    if (span_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!O!", &root, &PyList_Type, &spans, &PyDict_Type, &children))
        return NULL;
    while (PyDict_Next(children, &position, &key, &group)) {
        if (!PyList_Check(group)) {
            PyErr_SetString(Unsupported, "children that are not a list");
            return NULL;
        }
        const Py_ssize_t n = PyList_GET_SIZE(group);
        for (Py_ssize_t k = 0; k < n; k++)
            if (Py_TYPE(PyList_GET_ITEM(group, k)) != span_slots.type
                || SLOT(span_slots, PyList_GET_ITEM(group, k), SPAN_SERVICE) == NULL
                || SLOT(span_slots, PyList_GET_ITEM(group, k), SPAN_NAME) == NULL) {
                PyErr_SetString(Unsupported, "not a Span");
                return NULL;
            }
        grouped += n;
        if (n > fan_out)
            fan_out = n;
        if (n > 1) {
            Py_ssize_t most = most_repeated(group);
            if (most < 0)
                return NULL;
            if (most > repeated)
                repeated = most;
        }
    }
    if (root != Py_None) {
        if (Py_TYPE(root) != span_slots.type) {
            PyErr_SetString(Unsupported, "not a Span");
            return NULL;
        }
        /* each span is in one children list: a level holds at most all of them */
        frontier = PyMem_Malloc((size_t)(grouped + 1) * sizeof(PyObject *));
        next = PyMem_Malloc((size_t)(grouped + 1) * sizeof(PyObject *));
        if (frontier == NULL || next == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_ssize_t width = 1;
        frontier[0] = root;
        while (width > 0) {
            if (++depth > grouped + 1) {
                PyErr_SetString(Unsupported, "a cycle under the root");
                goto done;
            }
            Py_ssize_t below = 0;
            for (Py_ssize_t f = 0; f < width; f++) {
                PyObject *kids;
                if (children_of(frontier[f], children, &kids) < 0)
                    goto done;
                const Py_ssize_t n = kids == NULL ? 0 : PyList_GET_SIZE(kids);
                if (below + n > grouped + 1) {
                    PyErr_SetString(Unsupported, "a span in two levels");
                    goto done;
                }
                for (Py_ssize_t k = 0; k < n; k++)
                    next[below++] = PyList_GET_ITEM(kids, k);
            }
            PyObject **swap = frontier;
            frontier = next;
            next = swap;
            width = below;
        }
    }
    if ((services = PySet_New(NULL)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        if (Py_TYPE(span) != span_slots.type || SLOT(span_slots, span, SPAN_SERVICE) == NULL) {
            PyErr_SetString(Unsupported, "not a Span");
            goto done;
        }
        if (PySet_Add(services, SLOT(span_slots, span, SPAN_SERVICE)) < 0)
            goto done;
    }
    result = Py_BuildValue("(nnnn)", depth, fan_out, PySet_GET_SIZE(services), repeated);
done:
    Py_XDECREF(services);
    PyMem_Free(frontier);
    PyMem_Free(next);
    return result;
}

PyDoc_STRVAR(stage_totals_doc,
"stage_totals(keys, samples, index, width) -> [int, ...]\n\n"
"The stage columns of RootForest.row: ``width`` sums, each of the samples (None\n"
"skipped) of one stage key, its column taken from ``index`` (stage: column), or\n"
"given the next one while ``index`` has fewer than ``width``; keys past that are\n"
"left out.");

static PyObject *stage_totals(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *keys, *samples, *index, *out = NULL, *column_obj = NULL;
    Py_ssize_t width;
    uint64_t *sums = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!n", &PyList_Type, &keys, &PyList_Type, &samples, &PyDict_Type, &index, &width))
        return NULL;
    if (width < 0 || PyList_GET_SIZE(keys) != PyList_GET_SIZE(samples)) {
        PyErr_SetString(Unsupported, "samples not aligned with the keys");
        return NULL;
    }
    if ((sums = PyMem_Calloc((size_t)width + 1, sizeof(uint64_t))) == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *sample = PyList_GET_ITEM(samples, i);
        if (sample == Py_None)
            continue;
        uint64_t value = PyLong_Check(sample) ? PyLong_AsUnsignedLongLong(sample) : (uint64_t)-1;
        if (value == (uint64_t)-1) { /* not a u64 sample, or a sum that could overflow: the reference */
            PyErr_Clear();
            PyErr_SetString(Unsupported, "a sample that is not a 64-bit count");
            goto done;
        }
        PyObject *column = PyDict_GetItemWithError(index, key);
        Py_ssize_t at;
        if (column == NULL) {
            if (PyErr_Occurred())
                goto done;
            if (PyDict_GET_SIZE(index) >= width)
                continue;
            at = PyDict_GET_SIZE(index);
            if ((column_obj = PyLong_FromSsize_t(at)) == NULL || PyDict_SetItem(index, key, column_obj) < 0)
                goto done;
            Py_CLEAR(column_obj);
        } else {
            at = PyLong_Check(column) ? PyLong_AsSsize_t(column) : -1;
            if (at < 0 || at >= width) {
                PyErr_Clear();
                PyErr_SetString(Unsupported, "a column outside the row");
                goto done;
            }
        }
        if (sums[at] > UINT64_MAX - value) {
            PyErr_SetString(Unsupported, "a sum past 64 bits");
            goto done;
        }
        sums[at] += value;
    }
    if ((out = PyList_New(width)) == NULL)
        goto done;
    for (Py_ssize_t c = 0; c < width; c++) {
        PyObject *sum = PyLong_FromUnsignedLongLong(sums[c]);
        if (sum == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, c, sum);
    }
done:
    Py_XDECREF(column_obj);
    PyMem_Free(sums);
    return out;
}

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
    PyObject *spans = PyList_New(0), *by_id = PyDict_New(), *children = PyDict_New(), *orphans = NULL, *result = NULL;
    PyObject *stages = PyList_New(0), *failed_spans = PyList_New(0);
    PyObject *root = Py_None;
    uint64_t root_start = 0;
    Py_ssize_t duplicates = 0;
    if (own == NULL || spans == NULL || by_id == NULL || children == NULL || stages == NULL || failed_spans == NULL)
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
        PyObject *instance = SLOT(row_slots, row, ROW_INSTANCE);
        if (end == NULL || service == NULL || name == NULL || attrs == NULL || instance == NULL) {
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
                              PyBool_FromLong(finished), Py_NewRef(instance)};
        PyObject *span = fill(&span_slots, values);
        PyObject *stage = span == NULL ? NULL : interned_stage(service, name, kind, c[24]); /* the span holds kind */
        int failed = stage == NULL || PyList_Append(spans, span) < 0 || PyDict_SetItem(by_id, span_id, span) < 0
                     || PyList_Append(stages, stage) < 0
                     || (c[25] == STATUS_ERROR && PyList_Append(failed_spans, span) < 0);
        Py_XDECREF(stage);
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
    /* orphans: the spans whose parent is not in the trace, grouped by parent in first-seen order */
    orphans = PyList_New(0);
    if (orphans == NULL)
        goto done;
    Py_ssize_t position = 0;
    PyObject *parent, *group;
    while (PyDict_Next(children, &position, &parent, &group)) {
        int known = PyDict_Contains(by_id, parent);
        Py_ssize_t end = PyList_GET_SIZE(orphans);
        if (known < 0 || (!known && PyList_SetSlice(orphans, end, end, group) < 0))
            goto done;
    }
    result = Py_BuildValue("(OOOOnOOO)", spans, by_id, children, orphans, duplicates, root, stages, failed_spans);
done:
    Py_XDECREF(stages);
    Py_XDECREF(failed_spans);
    Py_XDECREF(orphans);
    Py_XDECREF(own);
    Py_XDECREF(spans);
    Py_XDECREF(by_id);
    Py_XDECREF(children);
    return result;
}

PyDoc_STRVAR(ended_after_parent_doc,
"ended_after_parent(spans, by_id, least) -> [(child, parent), ...]\n\n"
"The synchronous children (not PRODUCER or CONSUMER, no links) that ended more\n"
"than ``least`` ns after their parent, both finished: nearly every child ends in\n"
"time, and this is the scan over every span of every trace.");

static PyObject *ended_after_parent(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *spans, *by_id;
    long long least;
    if (!PyArg_ParseTuple(args, "O!O!L", &PyList_Type, &spans, &PyDict_Type, &by_id, &least))
        return NULL;
    if (span_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        if (Py_TYPE(span) != span_slots.type) {
            PyErr_SetString(PyExc_TypeError, "ended_after_parent() takes Span objects");
            goto fail;
        }
        PyObject *parent_id = SLOT(span_slots, span, SPAN_PARENT), *kind = SLOT(span_slots, span, SPAN_KIND);
        if (parent_id == NULL || parent_id == Py_None || SLOT(span_slots, span, SPAN_HAS_LINKS) == Py_True
            || SLOT(span_slots, span, SPAN_FINISHED) != Py_True || kind == NULL || !PyLong_Check(kind))
            continue;
        long k = PyLong_AsLong(kind);
        if (k == KIND_PRODUCER || k == KIND_CONSUMER)
            continue;
        PyObject *parent = PyDict_GetItemWithError(by_id, parent_id);
        if (parent == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        if (Py_TYPE(parent) != span_slots.type || SLOT(span_slots, parent, SPAN_FINISHED) != Py_True)
            continue;
        PyObject *end = SLOT(span_slots, span, SPAN_END), *parent_end = SLOT(span_slots, parent, SPAN_END);
        if (end == NULL || parent_end == NULL || !PyLong_Check(end) || !PyLong_Check(parent_end))
            continue;
        long long e = PyLong_AsLongLong(end), pe = PyLong_AsLongLong(parent_end);
        if ((e == -1 || pe == -1) && PyErr_Occurred()) { /* past int64: left to the Python reference */
            PyErr_Clear();
            PyObject *over = PyNumber_Subtract(end, parent_end), *bar = PyLong_FromLongLong(least);
            int beyond = over != NULL && bar != NULL ? PyObject_RichCompareBool(over, bar, Py_GT) : -1;
            Py_XDECREF(over);
            Py_XDECREF(bar);
            if (beyond < 0)
                goto fail;
            if (!beyond)
                continue;
        } else if (e - pe <= least) { /* finished ends are positive: no overflow */
            continue;
        }
        PyObject *pair = PyTuple_Pack(2, span, parent);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(gather_doc,
"gather(rows, start, pending, decided, Pending, schedule, max_seen, arrival, max_ahead) -> (stop, added, max_seen)\n\n"
"TraceAssembler._take over rows[start:], the assembler's intake: runs once per\n"
"span of every input. Each row joins its trace in ``pending`` (a new trace is\n"
"``Pending(stamp)``, put in ``pending`` and ``schedule``; a trace whose root\n"
"comes is put in ``schedule``; the row shares its trace's first id object) and\n"
"is stamped: ``arrival`` if it is >= 0 (wall clock), else its end time as\n"
"EventTimeClock.observe does, ``max_seen`` being the largest seen. It stops\n"
"before a row it leaves to _take (a trace already decided: a late span; a\n"
"time past int64; an end more than ``max_ahead`` past ``max_seen``, if that is\n"
">= 0 and something was seen); ``stop`` is that row's index, or len(rows).");

static Slots pending_slots;
static const char *PENDING_SLOTS[] = {"rows", "first_seen", "last_seen", "has_root", NULL};
enum { PENDING_ROWS = 0, PENDING_LAST_SEEN = 2, PENDING_HAS_ROOT = 3 };

/* Sets a slot holding an object reference to a new one (steals it). */
static void set_slot(PyObject **slot, PyObject *value) {
    PyObject *was = *slot;
    *slot = value;
    Py_XDECREF(was);
}

static PyObject *gather(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *rows, *pending, *decided, *pending_type, *schedule;
    Py_ssize_t i;
    long long max_seen, arrival, max_ahead;
    int local; /* fragment mode: a SERVER or CONSUMER span is a root too (its parent is in another pod) */
    if (!PyArg_ParseTuple(args, "O!nO!O!OO!LLLp", &PyList_Type, &rows, &i, &PyDict_Type, &pending, &PyDict_Type,
                          &decided, &pending_type, &PyDict_Type, &schedule, &max_seen, &arrival, &max_ahead, &local))
        return NULL;
    if (row_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if ((PyObject *)pending_slots.type != pending_type && bind_slots(&pending_slots, pending_type, PENDING_SLOTS) < 0)
        return NULL;
    static const uint8_t no_parent[8];
    Py_ssize_t added = 0;
    for (i = i < 0 ? 0 : i; i < PyList_GET_SIZE(rows); i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (Py_TYPE(row) != row_slots.type)
            break;
        PyObject *trace_id = SLOT(row_slots, row, ROW_TRACE_ID), *end = SLOT(row_slots, row, ROW_END);
        PyObject *core = SLOT(row_slots, row, ROW_CORE);
        if (trace_id == NULL || end == NULL || core == NULL || !PyLong_Check(end) || !PyBytes_Check(core))
            break;
        PyObject *trace = PyDict_GetItemWithError(pending, trace_id);
        if (trace == NULL && (PyErr_Occurred() || PyDict_Contains(decided, trace_id) != 0))
            break; /* an error (raised again by _take) or a late span */
        if (trace != NULL && (Py_TYPE(trace) != pending_slots.type || !PyList_Check(SLOT(pending_slots, trace, PENDING_ROWS))))
            break;
        long long stamp = arrival;
        if (arrival < 0) {
            long long event_time = PyLong_AsLongLong(end);
            if (event_time == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                break;
            }
            if (event_time > max_seen) {
                if (max_ahead >= 0 && max_seen > 0 && event_time - max_seen > max_ahead)
                    break; /* far ahead: the clock's observe decides whether to believe it */
                max_seen = event_time;
            }
            stamp = event_time;
            if (event_time == 0) { /* unfinished: "now", not before it started */
                uint64_t start;
                if (PyBytes_GET_SIZE(core) < 24)
                    break;
                memcpy(&start, PyBytes_AS_STRING(core) + 16, 8);
                if (start > (uint64_t)INT64_MAX)
                    break;
                stamp = (long long)start > max_seen ? (long long)start : max_seen;
            }
        }
        if (trace == NULL) {
            PyObject *stamp_obj = PyLong_FromLongLong(stamp);
            trace = stamp_obj == NULL ? NULL : PyObject_CallOneArg(pending_type, stamp_obj);
            Py_XDECREF(stamp_obj);
            if (trace == NULL)
                return NULL;
            if (Py_TYPE(trace) != pending_slots.type || !PyList_Check(SLOT(pending_slots, trace, PENDING_ROWS))) {
                Py_DECREF(trace);
                PyErr_SetString(PyExc_TypeError, "Pending() made something else");
                return NULL;
            }
            int stored = PyObject_SetItem(pending, trace_id, trace) < 0 || PyDict_SetItem(schedule, trace_id, trace) < 0;
            Py_DECREF(trace); /* pending holds it */
            if (stored)
                return NULL;
        } else {
            PyObject *last_seen = SLOT(pending_slots, trace, PENDING_LAST_SEEN);
            long long last = last_seen != NULL && PyLong_Check(last_seen) ? PyLong_AsLongLong(last_seen) : -1;
            if (last == -1 && (last_seen == NULL || !PyLong_Check(last_seen) || PyErr_Occurred())) {
                PyErr_Clear();
                break;
            }
            if (stamp > last) {
                PyObject *stamp_obj = PyLong_FromLongLong(stamp);
                if (stamp_obj == NULL)
                    return NULL;
                set_slot(&SLOT(pending_slots, trace, PENDING_LAST_SEEN), stamp_obj);
            }
            PyObject *held = SLOT(pending_slots, trace, PENDING_ROWS);
            PyObject *first = PyList_GET_SIZE(held) ? PyList_GET_ITEM(held, 0) : NULL;
            PyObject *shared = first != NULL && Py_TYPE(first) == row_slots.type ? SLOT(row_slots, first, ROW_TRACE_ID) : NULL;
            if (shared != NULL && shared != trace_id) { /* one id object per trace */
                set_slot(&SLOT(row_slots, row, ROW_TRACE_ID), Py_NewRef(shared));
                trace_id = shared;
            }
        }
        if (PyList_Append(SLOT(pending_slots, trace, PENDING_ROWS), row) < 0)
            return NULL;
        added++;
        if (SLOT(pending_slots, trace, PENDING_HAS_ROOT) != Py_True && PyBytes_GET_SIZE(core) >= 25
            && (memcmp(PyBytes_AS_STRING(core) + 8, no_parent, 8) == 0
                || (local && (PyBytes_AS_STRING(core)[24] == KIND_SERVER || PyBytes_AS_STRING(core)[24] == KIND_CONSUMER)))) {
            set_slot(&SLOT(pending_slots, trace, PENDING_HAS_ROOT), Py_NewRef(Py_True));
            if (PyDict_SetItem(schedule, trace_id, trace) < 0)
                return NULL;
        }
    }
    return Py_BuildValue("(nnL)", i, added, max_seen);
}

/* ---- OTLP/JSON: the same rows from the objects orjson parsed -------------------------
 *
 * Only the form the Collector's file exporter writes is walked here: hex ids of
 * exact length, integer enums, int64 as digit strings. Everything else (base64
 * ids, enum names, anything to reject, anything of an unexpected type) raises
 * Unsupported and the document goes to otlp_json._walk_traces, the reference,
 * which words every rejection. */

static PyObject *JSON_KEYS[15];
enum { J_RESOURCE_SPANS, J_RESOURCE, J_ATTRIBUTES, J_KEY, J_VALUE, J_SCOPE_SPANS, J_SPANS, J_TRACE_ID, J_SPAN_ID,
       J_PARENT_SPAN_ID, J_KIND, J_STATUS, J_CODE, J_START, J_END };
static const char *JSON_KEY_NAMES[] = {"resourceSpans", "resource", "attributes", "key", "value", "scopeSpans",
                                       "spans", "traceId", "spanId", "parentSpanId", "kind", "status", "code",
                                       "startTimeUnixNano", "endTimeUnixNano"};
static PyObject *J_NAME, *J_LINKS, *J_EVENTS, *SERVICE_NAME, *K8S_POD_NAME, *SERVICE_INSTANCE_ID, *VALUE_KEYS[4];

/* dict[key] or NULL when absent; -1 on an error. */
static int json_get(PyObject *dict, PyObject *key, PyObject **out) {
    *out = PyDict_GetItemWithError(dict, key);
    return *out == NULL && PyErr_Occurred() ? -1 : 0;
}

static int hex_digit(Py_UCS4 c) {
    return c >= '0' && c <= '9' ? (int)(c - '0') : c >= 'a' && c <= 'f' ? (int)(c - 'a' + 10)
         : c >= 'A' && c <= 'F' ? (int)(c - 'A' + 10) : -1;
}

/* 1 when ``text`` is exactly 2 * size hex digits (decoded into ``out``). */
static int json_hex(PyObject *text, uint8_t *out, Py_ssize_t size) {
    if (text == NULL || !PyUnicode_CheckExact(text) || PyUnicode_GET_LENGTH(text) != 2 * size ||
        PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND)
        return 0;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < size; i++) {
        int high = hex_digit(c[2 * i]), low = hex_digit(c[2 * i + 1]);
        if (high < 0 || low < 0)
            return 0;
        out[i] = (uint8_t)(high << 4 | low);
    }
    return 1;
}

/* int(value or 0) for an absent value, None, an int or a string of digits, in [0, 2**64). */
static int json_nanos(PyObject *value, uint64_t *out) {
    *out = 0;
    if (value == NULL || value == Py_None)
        return 1;
    if (PyLong_CheckExact(value)) {
        unsigned long long v = PyLong_AsUnsignedLongLong(value);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear(); /* negative or too large: the reference rejects it */
            return 0;
        }
        *out = v;
        return 1;
    }
    if (!PyUnicode_CheckExact(value) || PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND ||
        PyUnicode_GET_LENGTH(value) > 20)
        return 0;
    const Py_UCS1 *c = PyUnicode_1BYTE_DATA(value);
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < PyUnicode_GET_LENGTH(value); i++) {
        if (c[i] < '0' || c[i] > '9' || v > (UINT64_MAX - (c[i] - '0')) / 10)
            return 0;
        v = v * 10 + (c[i] - '0');
    }
    *out = v;
    return 1;
}

/* otlp_json._any_value, clipped as clip_value does: a new reference in *out, or 0 for
 * an intValue that is not a plain integer (the reference decides). -1 on an error. */
static int json_any_value(PyObject *value, Py_ssize_t limit, PyObject **out) {
    *out = NULL;
    if (value == NULL || !PyDict_Check(value)) {
        *out = Py_NewRef(Py_None);
        return 1;
    }
    for (int i = 0; i < 4; i++) {
        PyObject *found;
        if (json_get(value, VALUE_KEYS[i], &found) < 0)
            return -1;
        if (found == NULL)
            continue;
        if (i == 1) { /* intValue: int(found) */
            if (PyLong_CheckExact(found)) {
                *out = Py_NewRef(found);
                return 1;
            }
            if (!PyUnicode_CheckExact(found) || PyUnicode_KIND(found) != PyUnicode_1BYTE_KIND)
                return 0;
            Py_ssize_t n = PyUnicode_GET_LENGTH(found);
            const Py_UCS1 *c = PyUnicode_1BYTE_DATA(found);
            Py_ssize_t first = n > 0 && c[0] == '-';
            if (n - first < 1 || n > 20)
                return 0;
            for (Py_ssize_t k = first; k < n; k++)
                if (c[k] < '0' || c[k] > '9')
                    return 0;
            *out = PyLong_FromUnicodeObject(found, 10);
            return *out == NULL ? -1 : 1;
        }
        if (PyUnicode_Check(found) && PyUnicode_GET_LENGTH(found) > limit)
            *out = PyUnicode_Substring(found, 0, limit);
        else
            *out = Py_NewRef(found);
        return *out == NULL ? -1 : 1;
    }
    *out = Py_NewRef(Py_None);
    return 1;
}

/* A JSON list, or an empty one for an absent or None value; NULL with Unsupported otherwise. */
static PyObject *json_list(PyObject *node, PyObject *key) {
    static PyObject *empty;
    PyObject *value;
    if (json_get(node, key, &value) < 0)
        return NULL;
    if (value == NULL || value == Py_None) {
        if (empty == NULL && (empty = PyList_New(0)) == NULL)
            return NULL;
        return empty;
    }
    if (!PyList_Check(value)) {
        unsupported();
        return NULL;
    }
    return value;
}

/* A JSON resource attribute's value as a clipped, interned str in ``*out``: 1; 0
 * when it is no non-empty string (the reference then looks further). */
static int json_resource_text(Out *o, PyObject *kv, PyObject **out) {
    PyObject *value, *text;
    if (json_get(kv, JSON_KEYS[J_VALUE], &value) < 0)
        return -1;
    int got = json_any_value(value, PY_SSIZE_T_MAX, &text);
    if (got <= 0)
        return got < 0 ? -1 : unsupported();
    if (!PyUnicode_Check(text) || PyUnicode_GET_LENGTH(text) == 0) {
        Py_DECREF(text);
        return 0;
    }
    PyObject *cut = PyUnicode_CheckExact(text) && PyUnicode_GET_LENGTH(text) > o->name_limit
                        ? PyUnicode_Substring(text, 0, o->name_limit) : Py_NewRef(text);
    Py_DECREF(text);
    if (cut == NULL)
        return -1;
    if (!PyUnicode_CheckExact(cut)) {
        Py_DECREF(cut);
        return unsupported();
    }
    PyUnicode_InternInPlace(&cut);
    *out = cut;
    return 1;
}

/* otlp_json._resource_names: the first service.name, k8s.pod.name and
 * service.instance.id whose value is a non-empty string; the pod is the first
 * of the last two found. */
static int json_resource_names(Out *o, PyObject *resource_spans, PyObject *unknown_service) {
    PyObject *resource, *attributes, *service = NULL, *pod = NULL, *instance = NULL;
    if (json_get(resource_spans, JSON_KEYS[J_RESOURCE], &resource) < 0)
        return -1;
    if (resource != NULL && PyDict_Check(resource)) {
        if (json_get(resource, JSON_KEYS[J_ATTRIBUTES], &attributes) < 0)
            return -1;
        if (attributes != NULL && attributes != Py_None && !PyList_Check(attributes))
            return unsupported();
        for (Py_ssize_t i = 0; attributes != NULL && attributes != Py_None && i < PyList_GET_SIZE(attributes); i++) {
            PyObject *kv = PyList_GET_ITEM(attributes, i), *key, **slot = NULL;
            if (!PyDict_Check(kv))
                goto fail_unsupported;
            if (json_get(kv, JSON_KEYS[J_KEY], &key) < 0)
                goto fail;
            if (key == NULL || !PyUnicode_CheckExact(key))
                continue;
            if (_PyUnicode_Equal(key, SERVICE_NAME))
                slot = &service;
            else if (_PyUnicode_Equal(key, K8S_POD_NAME))
                slot = &pod;
            else if (_PyUnicode_Equal(key, SERVICE_INSTANCE_ID))
                slot = &instance;
            if (slot != NULL && *slot == NULL && json_resource_text(o, kv, slot) < 0)
                goto fail;
        }
    }
    o->service = service != NULL ? service : Py_NewRef(unknown_service);
    o->instance = pod != NULL ? pod : instance != NULL ? Py_NewRef(instance) : Py_NewRef(Py_None);
    Py_XDECREF(instance);
    return 0;
fail_unsupported:
    unsupported();
fail:
    Py_XDECREF(service);
    Py_XDECREF(pod);
    Py_XDECREF(instance);
    return -1;
}

/* The kept attributes of a JSON span (the reference's lambda in _walk_traces). */
static PyObject *json_kept_attributes(Out *o, const void *source) {
    PyObject *span = (PyObject *)source, *attributes;
    if (json_get(span, JSON_KEYS[J_ATTRIBUTES], &attributes) < 0)
        return NULL;
    PyObject *pairs = PyList_New(0);
    if (pairs == NULL || attributes == NULL || !PyObject_IsTrue(attributes))
        return pairs;
    if (!PyList_Check(attributes))
        goto unsupported;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(attributes); i++) {
        PyObject *kv = PyList_GET_ITEM(attributes, i), *key, *value, *pair;
        if (!PyDict_Check(kv))
            continue;
        if (json_get(kv, JSON_KEYS[J_KEY], &key) < 0)
            goto error;
        if (key == NULL || key == Py_None)
            continue;
        if (!PyUnicode_CheckExact(key))
            goto unsupported;
        int keep = PySet_Contains(o->kept_keys, key);
        if (keep > 0) {
            int seen = has_key(pairs, key);
            keep = seen < 0 ? -1 : !seen;
        }
        if (keep < 0)
            goto error;
        if (!keep)
            continue;
        PyObject *raw;
        if (json_get(kv, JSON_KEYS[J_VALUE], &raw) < 0)
            goto error;
        int got = json_any_value(raw, o->value_limit, &value);
        if (got < 0)
            goto error;
        if (got == 0)
            goto unsupported;
        pair = PyTuple_Pack(2, key, value);
        Py_DECREF(value);
        if (pair == NULL || PyList_Append(pairs, pair) < 0) {
            Py_XDECREF(pair);
            goto error;
        }
        Py_DECREF(pair);
    }
    return pairs;
unsupported:
    unsupported();
error:
    Py_DECREF(pairs);
    return NULL;
}

/* Whether a JSON span's response codes say it failed (proto_response_attribute's
 * rule over the reference's _any_value). */
static int json_response_failed(PyObject *span, int kind) {
    PyObject *attributes;
    if (json_get(span, JSON_KEYS[J_ATTRIBUTES], &attributes) < 0)
        return -1;
    if (attributes == NULL || !PyList_Check(attributes))
        return 0;
    Response r = NO_RESPONSE;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(attributes); i++) {
        PyObject *kv = PyList_GET_ITEM(attributes, i), *key, *raw, *value;
        if (!PyDict_Check(kv))
            continue;
        if (json_get(kv, JSON_KEYS[J_KEY], &key) < 0)
            return -1;
        if (key == NULL || !PyUnicode_CheckExact(key) || PyUnicode_KIND(key) != PyUnicode_1BYTE_KIND)
            continue;
        int which = response_key(PyUnicode_1BYTE_DATA(key), PyUnicode_GET_LENGTH(key));
        if (which == 0)
            continue;
        if (json_get(kv, JSON_KEYS[J_VALUE], &raw) < 0)
            return -1;
        int got = json_any_value(raw, PY_SSIZE_T_MAX, &value);
        if (got <= 0)
            return got < 0 ? -1 : unsupported();
        int64_t code;
        int overflow = 0, usable = 0;
        if (PyLong_CheckExact(value)) {
            code = PyLong_AsLongLongAndOverflow(value, &overflow);
            if (overflow)
                code = overflow > 0 ? INT64_MAX : INT64_MIN;
            usable = !(code == -1 && PyErr_Occurred());
        } else if (PyUnicode_CheckExact(value) && PyUnicode_KIND(value) == PyUnicode_1BYTE_KIND) {
            usable = digits_value(PyUnicode_1BYTE_DATA(value), PyUnicode_GET_LENGTH(value), &code);
        }
        Py_DECREF(value);
        if (PyErr_Occurred())
            return -1;
        if (usable)
            response_code(&r, which, code);
    }
    return response_failed(&r, kind);
}

static int json_span(Out *o, PyObject *span) {
    uint8_t trace[16], core[CORE_SIZE];
    PyObject *value, *status, *name;
    uint64_t start, end;
    if (!PyDict_Check(span))
        return unsupported();
    if (json_get(span, JSON_KEYS[J_TRACE_ID], &value) < 0)
        return -1;
    if (!json_hex(value, trace, 16) || memcmp(trace, ZERO, 16) == 0)
        return unsupported();
    if (json_get(span, JSON_KEYS[J_SPAN_ID], &value) < 0)
        return -1;
    if (!json_hex(value, core, 8) || memcmp(core, ZERO, 8) == 0)
        return unsupported();
    if (json_get(span, JSON_KEYS[J_PARENT_SPAN_ID], &value) < 0)
        return -1;
    if (value == NULL || value == Py_None || (PyUnicode_Check(value) && PyUnicode_GET_LENGTH(value) == 0))
        memset(core + 8, 0, 8);
    else if (!json_hex(value, core + 8, 8))
        return unsupported();
    if (json_get(span, JSON_KEYS[J_KIND], &value) < 0)
        return -1;
    long kind = 0;
    if (value != NULL && value != Py_None) {
        if (!PyLong_CheckExact(value) || (kind = PyLong_AsLong(value)) < 0 || kind > 5) {
            PyErr_Clear();
            return unsupported();
        }
    }
    long code = 0;
    if (json_get(span, JSON_KEYS[J_STATUS], &status) < 0)
        return -1;
    if (status != NULL && status != Py_None && !(PyDict_Check(status) && PyDict_GET_SIZE(status) == 0)) {
        if (!PyDict_Check(status) || json_get(status, JSON_KEYS[J_CODE], &value) < 0)
            return PyErr_Occurred() ? -1 : unsupported();
        if (value != NULL && value != Py_None &&
            (!PyLong_CheckExact(value) || (code = PyLong_AsLong(value)) < 0 || code > 2)) {
            PyErr_Clear();
            return unsupported();
        }
    }
    if (json_get(span, JSON_KEYS[J_START], &value) < 0)
        return -1;
    if (!json_nanos(value, &start))
        return unsupported();
    if (json_get(span, JSON_KEYS[J_END], &value) < 0)
        return -1;
    if (!json_nanos(value, &end))
        return unsupported();
    if (json_get(span, J_NAME, &name) < 0 || json_get(span, J_LINKS, &value) < 0)
        return -1;
    if (name == NULL || name == Py_None)
        name = PyUnicode_New(0, 0);
    else if (!PyUnicode_CheckExact(name))
        return unsupported();
    else if (PyUnicode_GET_LENGTH(name) > o->name_limit)
        name = PyUnicode_Substring(name, 0, o->name_limit);
    else
        Py_INCREF(name);
    if (name == NULL)
        return -1;
    PyUnicode_InternInPlace(&name);
    int links = value == NULL ? 0 : PyObject_IsTrue(value);
    if (links >= 0 && code == 0) {
        int failed = json_response_failed(span, (int)kind);
        if (failed < 0)
            links = -1;
        else if (failed)
            code = STATUS_ERROR;
    }
    if (links < 0) {
        Py_DECREF(name);
        return -1;
    }
    memcpy(core + 16, &start, 8);
    core[24] = (uint8_t)kind;
    core[25] = (uint8_t)code;
    core[26] = links ? 1 : 0;
    if (add_row(o, trace, core, end, name, json_kept_attributes, span) < 0 || json_get(span, J_EVENTS, &value) < 0)
        return -1;
    int events = value == NULL ? 0 : PyObject_IsTrue(value);
    return events <= 0 ? events : add_evented(o, Py_NewRef(span));
}

PyDoc_STRVAR(decode_json_spans_doc,
"decode_json_spans(document, stages, kept_keys, name_limit, value_limit, unknown_service)\n"
"-> (rows, pending, evented)\n\n"
"``evented`` lists (row, span object) of the spans that have events.\n"
"decode_spans for a TracesData object parsed from OTLP/JSON; raises Unsupported\n"
"for anything but the Collector's own form, or anything the reference would reject.");

static PyObject *decode_json_spans(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *document, *stages, *kept_keys, *unknown_service;
    Py_ssize_t name_limit, value_limit;
    if (row_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!nnU", &PyDict_Type, &document, &PyDict_Type, &stages, &PyFrozenSet_Type,
                          &kept_keys, &name_limit, &value_limit, &unknown_service))
        return NULL;
    Out o = {PyList_New(0), NULL, PyList_New(0), stages, kept_keys, NULL, NULL, name_limit, value_limit, 0, 0,
             PyList_New(0)};
    PyObject *result = NULL, *resources = NULL;
    if (o.rows == NULL || o.pending == NULL || o.evented == NULL || (resources = json_list(document, JSON_KEYS[J_RESOURCE_SPANS])) == NULL)
        goto done;
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(resources); r++) {
        PyObject *resource_spans = PyList_GET_ITEM(resources, r), *scopes;
        if (!PyDict_Check(resource_spans)) {
            unsupported();
            goto done;
        }
        if (json_resource_names(&o, resource_spans, unknown_service) < 0)
            goto done;
        int failed = (scopes = json_list(resource_spans, JSON_KEYS[J_SCOPE_SPANS])) == NULL;
        for (Py_ssize_t s = 0; !failed && s < PyList_GET_SIZE(scopes); s++) {
            PyObject *scope = PyList_GET_ITEM(scopes, s), *spans;
            failed = !PyDict_Check(scope) ? unsupported() : (spans = json_list(scope, JSON_KEYS[J_SPANS])) == NULL;
            for (Py_ssize_t i = 0; !failed && i < PyList_GET_SIZE(spans); i++)
                failed = json_span(&o, PyList_GET_ITEM(spans, i)) < 0;
        }
        Py_CLEAR(o.service);
        Py_CLEAR(o.instance);
        if (failed)
            goto done;
    }
    result = PyTuple_Pack(3, o.rows, o.pending, o.evented);
done:
    Py_XDECREF(o.rows);
    Py_XDECREF(o.pending);
    Py_XDECREF(o.evented);
    return result;
}

PyDoc_STRVAR(json_nesting_doc,
"json_nesting(chunk, depth, state, limit) -> (depth, state)\n\n"
"Follows the nesting of a JSON text chunk by chunk: ``depth`` and ``state``\n"
"(inside a string, after a backslash) carry over between chunks. Stops at the\n"
"first bracket that goes past ``limit`` (the depth returned is then above it).\n"
"A streaming parser that builds a path per event costs the square of the depth.");

static PyObject *json_nesting(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer chunk;
    Py_ssize_t depth, limit;
    int state;
    if (!PyArg_ParseTuple(args, "y*nin", &chunk, &depth, &state, &limit))
        return NULL;
    const uint8_t *p = chunk.buf, *end = p + chunk.len;
    int in_string = state & 1, escaped = state & 2;
    for (; p < end; p++) {
        uint8_t c = *p;
        if (in_string) {
            if (escaped)
                escaped = 0;
            else if (c == '\\')
                escaped = 2;
            else if (c == '"')
                in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '[' || c == '{') {
            if (++depth > limit)
                break;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    PyBuffer_Release(&chunk);
    return Py_BuildValue("ni", depth, in_string | escaped);
}

static Slots stage_latency_slots, window_slots;
static const char *STAGE_LATENCY_SLOTS[] = {"window", "slow_threshold", NULL};
enum { STAGE_WINDOW, STAGE_SLOW_THRESHOLD };
static const char *WINDOW_SLOTS[] = {"index", "self_ns", "total_ns", "trace_ids", "ends", "min_event", NULL};
enum { WINDOW_INDEX, WINDOW_SELF_NS, WINDOW_TOTAL_NS, WINDOW_TRACE_IDS, WINDOW_ENDS, WINDOW_MIN_EVENT };

static PyObject *bind_latency(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *stage_type, *window_type;
    if (!PyArg_ParseTuple(args, "OO", &stage_type, &window_type)
        || bind_slots(&stage_latency_slots, stage_type, STAGE_LATENCY_SLOTS) < 0
        || bind_slots(&window_slots, window_type, WINDOW_SLOTS) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* An exact int in 0 .. 2**64 - 2 (-1 is the error value): 0 and *out, else -1 with no error set. */
static int u64_of(PyObject *value, uint64_t *out) {
    if (value == NULL || !PyLong_CheckExact(value))
        return -1;
    *out = PyLong_AsUnsignedLongLong(value);
    if (*out == (uint64_t)-1) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(window_samples_doc,
"window_samples(keys, spans, samples, trace_id, stages, index, cap, start) -> stop\n\n"
"LatencyModel.observe's loop from ``start``: each span with a sample whose stage\n"
"(``stages[key]``) has its window ``index`` open adds its sample (0 as 1), its\n"
"duration (0 as 1), ``trace_id`` and its end there, while the window holds fewer\n"
"than ``cap``; the window's ``min_event`` follows the earliest end. It stops\n"
"before a span it leaves to the Python (a stage not known, a window to close or\n"
"open, values no decoder makes): ``stop`` is that span's index, or len(keys).");

static PyObject *window_samples(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *keys, *spans, *samples, *trace_id, *stages, *index;
    Py_ssize_t cap, start, i;
    if (span_slots.type == NULL || window_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() and bind_latency() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!OO!Onn", &PyList_Type, &keys, &PyList_Type, &spans, &PyList_Type, &samples,
                          &trace_id, &PyDict_Type, &stages, &index, &cap, &start))
        return NULL;
    const Py_ssize_t count = PyList_GET_SIZE(keys);
    if (PyList_GET_SIZE(spans) != count || PyList_GET_SIZE(samples) != count) {
        PyErr_SetString(PyExc_ValueError, "keys, spans and samples not aligned");
        return NULL;
    }
    for (i = start < 0 ? 0 : start; i < count; i++) {
        PyObject *sample = PyList_GET_ITEM(samples, i), *span = PyList_GET_ITEM(spans, i);
        if (sample == Py_None)
            continue;
        PyObject *stage = PyDict_GetItemWithError(stages, PyList_GET_ITEM(keys, i));
        if (stage == NULL) {
            if (PyErr_Occurred())
                return NULL;
            break; /* a new stage, or one not tracked */
        }
        if (Py_TYPE(stage) != stage_latency_slots.type || Py_TYPE(span) != span_slots.type)
            break;
        PyObject *window = SLOT(stage_latency_slots, stage, STAGE_WINDOW);
        if (window == NULL || Py_TYPE(window) != window_slots.type)
            break; /* none open */
        PyObject *window_index = SLOT(window_slots, window, WINDOW_INDEX);
        int same = window_index == NULL ? 0 : PyObject_RichCompareBool(window_index, index, Py_EQ);
        if (same < 0)
            return NULL;
        PyObject *self_list = SLOT(window_slots, window, WINDOW_SELF_NS);
        PyObject *total_list = SLOT(window_slots, window, WINDOW_TOTAL_NS);
        PyObject *id_list = SLOT(window_slots, window, WINDOW_TRACE_IDS), *end_list = SLOT(window_slots, window, WINDOW_ENDS);
        PyObject *min_event = SLOT(window_slots, window, WINDOW_MIN_EVENT);
        if (!same || self_list == NULL || total_list == NULL || id_list == NULL || end_list == NULL
            || min_event == NULL || !PyList_CheckExact(self_list) || !PyList_CheckExact(total_list)
            || !PyList_CheckExact(id_list) || !PyList_CheckExact(end_list))
            break; /* another window: the Python closes this one */
        if (PyList_GET_SIZE(self_list) >= cap)
            continue; /* full: the sample is not kept */
        PyObject *end = SLOT(span_slots, span, SPAN_END);
        uint64_t from, to, self_ns;
        if (u64_of(SLOT(span_slots, span, SPAN_START), &from) < 0 || u64_of(end, &to) < 0 || to < from
            || u64_of(sample, &self_ns) < 0)
            break; /* values no decoder makes */
        PyObject *total = PyLong_FromUnsignedLongLong(to > from ? to - from : 1);
        PyObject *one = self_ns == 0 ? PyLong_FromLong(1) : NULL;
        int failed = total == NULL || (self_ns == 0 && one == NULL)
                     || PyList_Append(self_list, self_ns == 0 ? one : sample) < 0 || PyList_Append(total_list, total) < 0
                     || PyList_Append(id_list, trace_id) < 0 || PyList_Append(end_list, end) < 0;
        Py_XDECREF(total);
        Py_XDECREF(one);
        if (failed)
            return NULL;
        int earlier = PyObject_RichCompareBool(end, min_event, Py_LT);
        if (earlier < 0)
            return NULL;
        if (earlier)
            set_slot(&SLOT(window_slots, window, WINDOW_MIN_EVENT), Py_NewRef(end));
    }
    return PyLong_FromSsize_t(i);
}

PyDoc_STRVAR(beyond_slow_threshold_doc,
"beyond_slow_threshold(keys, samples, stages) -> [index, ...]\n\n"
"SlowStage's scan: the spans whose sample (None skipped) is above the\n"
"slow_threshold of its stage (``stages[key]``, a StageLatency; none set: not\n"
"above). Nearly every span is below: the scan runs over every span of every\n"
"decided trace.");

static PyObject *beyond_slow_threshold(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *keys, *samples, *stages;
    if (stage_latency_slots.type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind_latency() first");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &keys, &PyList_Type, &samples, &PyDict_Type, &stages))
        return NULL;
    if (PyList_GET_SIZE(keys) != PyList_GET_SIZE(samples)) {
        PyErr_SetString(PyExc_ValueError, "keys and samples not aligned");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *sample = PyList_GET_ITEM(samples, i);
        if (sample == Py_None)
            continue;
        PyObject *stage = PyDict_GetItemWithError(stages, PyList_GET_ITEM(keys, i));
        if (stage == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        if (Py_TYPE(stage) != stage_latency_slots.type) {
            PyErr_SetString(Unsupported, "stages that are not StageLatency objects");
            goto fail;
        }
        PyObject *threshold = SLOT(stage_latency_slots, stage, STAGE_SLOW_THRESHOLD);
        if (threshold == NULL || threshold == Py_None)
            continue;
        int above = PyObject_RichCompareBool(sample, threshold, Py_GT);
        PyObject *at = above > 0 ? PyLong_FromSsize_t(i) : NULL;
        int failed = above < 0 || (above > 0 && (at == NULL || PyList_Append(out, at) < 0));
        Py_XDECREF(at);
        if (failed)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(SpanRow, Span, LogRow, schema, any_value, logs_root): the classes whose slots the decoders and\n"
     "expand fill, the message schema (the traces request first), the index of AnyValue and of the\n"
     "logs request in it."},
    {"decode_spans", decode_spans, METH_VARARGS, decode_spans_doc},
    {"decode_logs", decode_logs, METH_VARARGS, decode_logs_doc},
    {"decode_json_spans", decode_json_spans, METH_VARARGS, decode_json_spans_doc},
    {"expand", expand, METH_O, expand_doc},
    {"self_times", self_times, METH_VARARGS, self_times_doc},
    {"latency_keys", latency_keys, METH_VARARGS, latency_keys_doc},
    {"latency_samples", latency_samples, METH_VARARGS, latency_samples_doc},
    {"shape", shape, METH_VARARGS, shape_doc},
    {"stage_totals", stage_totals, METH_VARARGS, stage_totals_doc},
    {"bind_latency", bind_latency, METH_VARARGS,
     "bind_latency(StageLatency, _Window): the classes whose slots window_samples reads and fills."},
    {"window_samples", window_samples, METH_VARARGS, window_samples_doc},
    {"beyond_slow_threshold", beyond_slow_threshold, METH_VARARGS, beyond_slow_threshold_doc},
    {"ended_after_parent", ended_after_parent, METH_VARARGS, ended_after_parent_doc},
    {"gather", gather, METH_VARARGS, gather_doc},
    {"json_nesting", json_nesting, METH_VARARGS, json_nesting_doc},
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
    for (int i = 0; i < (int)(sizeof(JSON_KEYS) / sizeof(*JSON_KEYS)); i++)
        if ((JSON_KEYS[i] = PyUnicode_InternFromString(JSON_KEY_NAMES[i])) == NULL)
            return NULL;
    static const char *value_keys[] = {"stringValue", "intValue", "boolValue", "doubleValue"};
    for (int i = 0; i < 4; i++)
        if ((VALUE_KEYS[i] = PyUnicode_InternFromString(value_keys[i])) == NULL)
            return NULL;
    if ((J_NAME = PyUnicode_InternFromString("name")) == NULL || (J_LINKS = PyUnicode_InternFromString("links")) == NULL
        || (J_EVENTS = PyUnicode_InternFromString("events")) == NULL
        || (SERVICE_NAME = PyUnicode_InternFromString("service.name")) == NULL
        || (K8S_POD_NAME = PyUnicode_InternFromString("k8s.pod.name")) == NULL
        || (SERVICE_INSTANCE_ID = PyUnicode_InternFromString("service.instance.id")) == NULL)
        return NULL;
    return m;
}
