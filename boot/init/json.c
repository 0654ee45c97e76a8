/*
 * A strict, small JSON parser (RFC 8259) for the run-time configuration the init reads from a
 * cloud: fuse's user-data and OpenStack's meta_data.json. The whole document becomes a tree;
 * strings are decoded to UTF-8 (surrogate pairs joined) and may not hold NUL, since they end
 * up in argv and the environment. Nesting is bounded so hostile input cannot exhaust the stack.
 */
#define _GNU_SOURCE
#include "init.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 32

struct parser {
	const char *p, *end;
	char *err;
	size_t errlen;
	bool failed;
};

__attribute__((format(printf, 2, 3))) static struct json *fail(struct parser *ps,
								const char *fmt, ...)
{
	if (!ps->failed) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(ps->err, ps->errlen, fmt, ap);
		va_end(ap);
		ps->failed = true;
	}
	return NULL;
}

static void skip_ws(struct parser *ps)
{
	while (ps->p < ps->end &&
	       (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
		ps->p++;
}

static struct json *node(enum json_type type)
{
	struct json *j = xmalloc(sizeof(*j));
	memset(j, 0, sizeof(*j));
	j->type = type;
	return j;
}

static int hex4(const char *s)
{
	int v = 0;
	for (int i = 0; i < 4; i++) {
		char c = s[i];
		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

static size_t put_utf8(char *out, unsigned cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xC0 | cp >> 6);
		out[1] = (char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xE0 | cp >> 12);
		out[1] = (char)(0x80 | (cp >> 6 & 0x3F));
		out[2] = (char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | cp >> 18);
	out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
	out[2] = (char)(0x80 | (cp >> 6 & 0x3F));
	out[3] = (char)(0x80 | (cp & 0x3F));
	return 4;
}

/* A string at ps->p (on its opening quote), decoded into a malloc'ed NUL-terminated buffer.
 * Decoding never grows it: every escape is at least as long as what it stands for. */
static char *parse_string(struct parser *ps)
{
	ps->p++; /* the opening quote */
	char *out = xmalloc((size_t)(ps->end - ps->p) + 1);
	size_t n = 0;
	while (ps->p < ps->end && *ps->p != '"') {
		unsigned char c = (unsigned char)*ps->p;
		if (c < 0x20) {
			free(out);
			fail(ps, "a string holds a raw control character (0x%02x)", c);
			return NULL;
		}
		if (c != '\\') {
			out[n++] = (char)c;
			ps->p++;
			continue;
		}
		if (ps->end - ps->p < 2)
			break;
		char e = ps->p[1];
		ps->p += 2;
		switch (e) {
		case '"': out[n++] = '"'; break;
		case '\\': out[n++] = '\\'; break;
		case '/': out[n++] = '/'; break;
		case 'b': out[n++] = '\b'; break;
		case 'f': out[n++] = '\f'; break;
		case 'n': out[n++] = '\n'; break;
		case 'r': out[n++] = '\r'; break;
		case 't': out[n++] = '\t'; break;
		case 'u': {
			int cp = ps->end - ps->p >= 4 ? hex4(ps->p) : -1;
			if (cp < 0)
				goto bad_escape;
			ps->p += 4;
			if (cp >= 0xD800 && cp <= 0xDBFF) {
				/* A high surrogate must be followed by its low half. */
				int lo = ps->end - ps->p >= 6 && ps->p[0] == '\\' && ps->p[1] == 'u'
						 ? hex4(ps->p + 2)
						 : -1;
				if (lo < 0xDC00 || lo > 0xDFFF)
					goto bad_escape;
				ps->p += 6;
				cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
			} else if (cp >= 0xDC00 && cp <= 0xDFFF) {
				goto bad_escape;
			}
			if (cp == 0) {
				free(out);
				fail(ps, "a string holds \\u0000, which no argument or variable can");
				return NULL;
			}
			n += put_utf8(out + n, (unsigned)cp);
			break;
		}
		default:
			goto bad_escape;
		}
	}
	if (ps->p >= ps->end) {
		free(out);
		fail(ps, "a string is not closed");
		return NULL;
	}
	ps->p++; /* the closing quote */
	out[n] = '\0';
	return out;
bad_escape:
	free(out);
	fail(ps, "a string has an invalid escape");
	return NULL;
}

static struct json *parse_value(struct parser *ps, int depth);

static struct json *parse_container(struct parser *ps, int depth, bool object)
{
	if (depth >= MAX_DEPTH)
		return fail(ps, "nested deeper than %d levels", MAX_DEPTH);
	struct json *j = node(object ? JSON_OBJECT : JSON_ARRAY);
	char close = object ? '}' : ']';
	ps->p++;
	skip_ws(ps);
	if (ps->p < ps->end && *ps->p == close) {
		ps->p++;
		return j;
	}
	for (;;) {
		char *key = NULL;
		if (object) {
			skip_ws(ps);
			if (ps->p >= ps->end || *ps->p != '"') {
				json_free(j);
				return fail(ps, "an object key is not a string");
			}
			key = parse_string(ps);
			if (!key) {
				json_free(j);
				return NULL;
			}
			skip_ws(ps);
			if (ps->p >= ps->end || *ps->p != ':') {
				fail(ps, "':' expected after the key \"%.40s\"", key);
				free(key);
				json_free(j);
				return NULL;
			}
			ps->p++;
		}
		struct json *v = parse_value(ps, depth + 1);
		if (!v) {
			free(key);
			json_free(j);
			return NULL;
		}
		j->items = xrealloc(j->items, (j->n + 1) * sizeof(*j->items));
		j->items[j->n] = v;
		if (object) {
			j->keys = xrealloc(j->keys, (j->n + 1) * sizeof(*j->keys));
			j->keys[j->n] = key;
		}
		j->n++;
		skip_ws(ps);
		if (ps->p < ps->end && *ps->p == ',') {
			ps->p++;
			continue;
		}
		if (ps->p < ps->end && *ps->p == close) {
			ps->p++;
			return j;
		}
		json_free(j);
		return fail(ps, "',' or '%c' expected", close);
	}
}

/* A number's text, checked against the JSON grammar; kept as text (callers compare it). */
static struct json *parse_number(struct parser *ps)
{
	const char *s = ps->p, *p = s;
#define DIGITS(at_least_one)                                                                    \
	do {                                                                                    \
		const char *d0 = p;                                                             \
		while (p < ps->end && *p >= '0' && *p <= '9')                                   \
			p++;                                                                    \
		if ((at_least_one) && p == d0)                                                  \
			return fail(ps, "a number is malformed");                               \
	} while (0)
	if (p < ps->end && *p == '-')
		p++;
	if (p < ps->end && *p == '0')
		p++;
	else
		DIGITS(true);
	if (p < ps->end && *p == '.') {
		p++;
		DIGITS(true);
	}
	if (p < ps->end && (*p == 'e' || *p == 'E')) {
		p++;
		if (p < ps->end && (*p == '+' || *p == '-'))
			p++;
		DIGITS(true);
	}
#undef DIGITS
	struct json *j = node(JSON_NUMBER);
	j->str = xmalloc((size_t)(p - s) + 1);
	memcpy(j->str, s, (size_t)(p - s));
	j->str[p - s] = '\0';
	ps->p = p;
	return j;
}

static bool literal(struct parser *ps, const char *word)
{
	size_t n = strlen(word);
	if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
		return false;
	ps->p += n;
	return true;
}

static struct json *parse_value(struct parser *ps, int depth)
{
	skip_ws(ps);
	if (ps->p >= ps->end)
		return fail(ps, "a value is missing (the text ends early)");
	char c = *ps->p;
	if (c == '{' || c == '[')
		return parse_container(ps, depth, c == '{');
	if (c == '"') {
		char *s = parse_string(ps);
		if (!s)
			return NULL;
		struct json *j = node(JSON_STRING);
		j->str = s;
		return j;
	}
	if (c == '-' || (c >= '0' && c <= '9'))
		return parse_number(ps);
	bool is_true = literal(ps, "true");
	if (is_true || literal(ps, "false")) {
		struct json *j = node(JSON_BOOL);
		j->boolean = is_true;
		return j;
	}
	if (literal(ps, "null"))
		return node(JSON_NULL);
	return fail(ps, "unexpected character '%c'", c);
}

struct json *json_parse(const char *buf, size_t len, char *err, size_t errlen)
{
	struct parser ps = {.p = buf, .end = buf + len, .err = err, .errlen = errlen};
	struct json *j = parse_value(&ps, 0);
	if (!j)
		return NULL;
	skip_ws(&ps);
	if (ps.p != ps.end) {
		json_free(j);
		fail(&ps, "text follows the value");
		return NULL;
	}
	return j;
}

void json_free(struct json *j)
{
	if (!j)
		return;
	for (size_t i = 0; i < j->n; i++) {
		json_free(j->items[i]);
		if (j->keys)
			free(j->keys[i]);
	}
	free(j->items);
	free(j->keys);
	free(j->str);
	free(j);
}

const struct json *json_get(const struct json *obj, const char *key)
{
	if (!obj || obj->type != JSON_OBJECT)
		return NULL;
	/* The last of duplicate keys wins, as in most parsers. */
	for (size_t i = obj->n; i-- > 0;)
		if (strcmp(obj->keys[i], key) == 0)
			return obj->items[i];
	return NULL;
}
