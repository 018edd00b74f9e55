/*
 * fuzz_certname.c: libFuzzer target for the client-certificate name check
 * (PROTOCOL.md 2.10); built only with OpenSSL.
 *
 * Each input is used twice:
 *  - as byte 0 = pattern length p, then p bytes of certificate name
 *    pattern (arbitrary bytes), then the monitor name (NUL-terminated
 *    here): tls_name_match() is run on them and compared with an
 *    independent statement of the rules of 2.10;
 *  - as a DER certificate: when d2i_X509() accepts it, tls_cert_match()
 *    is run against "vp1.example.org" and against the name above.
 */
#define SC_REMOTED_NO_MAIN 1
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../../sc_remoted.c"

#ifndef HAVE_OPENSSL
#error fuzz_certname needs OpenSSL
#endif

#define FZ_FAIL(...) do {						\
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__);			\
    fprintf(stderr, "\n");						\
    abort();								\
  } while(0)

static int fz_lower(int c)
{
  return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

static int fz_eq_ci(const char *a, const char *b, size_t n)
{
  size_t i;
  for(i=0; i<n; i++)
    if(fz_lower((unsigned char)a[i]) != fz_lower((unsigned char)b[i]))
      return 0;
  return 1;
}

/*
 * 2.10: a pattern "*.S" matches a name L.S' where L is one non-empty
 * label (no '.') and .S' equals .S ignoring case; any other pattern
 * matches a name equal to it ignoring case.  Names hold no NUL.
 */
static int fz_ref_match(const char *pat, size_t plen, const char *name)
{
  size_t nlen = strlen(name), llen, i;
  if(plen >= 2 && pat[0] == '*' && pat[1] == '.')
    {
      if(plen - 1 >= nlen)
	return 0;
      llen = nlen - (plen - 1);
      for(i=0; i<llen; i++)
	if(name[i] == '.')
	  return 0;
      return fz_eq_ci(name + llen, pat + 1, plen - 1);
    }
  return plen == nlen && fz_eq_ci(pat, name, nlen);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  const unsigned char *dp = data;
  size_t plen, nlen;
  char *pat, *name;
  X509 *cert;
  int got, want;

  if(size < 1)
    return 0;
  plen = data[0];
  if(plen > size - 1)
    plen = size - 1;
  nlen = size - 1 - plen;
  if((pat = malloc(plen > 0 ? plen : 1)) == NULL ||
     (name = malloc(nlen + 1)) == NULL)
    abort();
  memcpy(pat, data + 1, plen);
  memcpy(name, data + 1 + plen, nlen);
  name[nlen] = '\0';

  got = tls_name_match(pat, plen, name) ? 1 : 0;
  want = fz_ref_match(pat, plen, name);
  if(got != want)
    FZ_FAIL("tls_name_match(\"%.*s\", \"%s\") = %d, expected %d",
	    (int)plen, pat, name, got, want);

  if((cert = d2i_X509(NULL, &dp, (long)size)) != NULL)
    {
      tls_cert_match(cert, "vp1.example.org");
      tls_cert_match(cert, name);
      X509_free(cert);
    }
  ERR_clear_error();
  free(pat);
  free(name);
  return 0;
}
