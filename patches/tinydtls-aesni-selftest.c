/*
 * Self-test of patches/tinydtls-aesni.patch, built and run by
 * scripts/dtlssocket_build.sh before the patched DTLSSocket is installed.
 * Checks the FIPS-197 Appendix A.1 key expansion and C.1 AES-128 vectors and
 * RFC 3610 packet vector #1 (AES-CCM), that CCM decryption inverts encryption
 * and refuses a changed tag, then prints a running digest of 100 key schedules,
 * 100,000 chained AES blocks and CCM records of every length from 0 to 1,100
 * octets. The script runs it once with
 * the CPU's AES instructions and once with tinydtls's table code
 * (OTACOAP_TINYDTLS_AESNI=0) and installs only if both runs pass and print the
 * same digest.
 */
#include <stdio.h>
#include <string.h>

#include "ccm.h"

static unsigned long digest;

static void
absorb(const unsigned char *p, size_t n)
{
	while (n--)
		digest = digest * 131 + *p++;
}

static int
fail(const char *what)
{
	printf("%s\n", what);
	return 1;
}

int
main(void)
{
	static const aes_u8 key[16] = {
	    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
	    0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f};
	static const aes_u8 pt[16] = {
	    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
	    0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff};
	static const aes_u8 want[16] = {
	    0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30,
	    0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a};
	/* RFC 3610 section 8, packet vector #1: M = 8, L = 2 */
	static const unsigned char ccm_key[16] = {
	    0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
	    0xc8, 0xc9, 0xca, 0xcb, 0xcc, 0xcd, 0xce, 0xcf};
	static const unsigned char ccm_nonce[16] = {
	    0x00, 0x00, 0x00, 0x03, 0x02, 0x01, 0x00, 0xa0,
	    0xa1, 0xa2, 0xa3, 0xa4, 0xa5};
	static const unsigned char ccm_out[31] = {
	    0x58, 0x8c, 0x97, 0x9a, 0x61, 0xc6, 0x63, 0xd2,
	    0xf0, 0x66, 0xd0, 0xc2, 0xc0, 0xf9, 0x89, 0x80,
	    0x6d, 0x5f, 0x6b, 0x61, 0xda, 0xc3, 0x84, 0x17,
	    0xe8, 0xd1, 0x2c, 0xfd, 0xf9, 0x26, 0xe0};
	/* FIPS-197 Appendix A.1: the key, and the last word of its schedule */
	static const aes_u8 a1_key[16] = {
	    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6,
	    0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c};
	rijndael_ctx ctx;
	aes_u8 block[16], k[16];
	unsigned char aad[13], nonce[16] = {0}, msg[1100 + 16], copy[1100 + 16];
	size_t n;
	int i;

	if (rijndael_set_key_enc_only(&ctx, a1_key, 128) != 0)
		return 2;
	if (ctx.Nr != 10 || ctx.ek[0] != 0x2b7e1516 || ctx.ek[4] != 0xa0fafe17 ||
	    ctx.ek[43] != 0xb6630ca6)
		return fail("FIPS-197 A.1 key expansion: wrong round keys");

	if (rijndael_set_key_enc_only(&ctx, key, 128) != 0)
		return 2;
	rijndael_encrypt(&ctx, pt, block);
	if (memcmp(block, want, sizeof want) != 0)
		return fail("FIPS-197 C.1 vector: wrong ciphertext");

	if (rijndael_set_key_enc_only(&ctx, ccm_key, 128) != 0)
		return 2;
	for (i = 0; i < 31; i++)
		msg[i] = (unsigned char)i;	/* 8 octets of aad, 23 of payload */
	if (dtls_ccm_encrypt_message(&ctx, 8, 2, ccm_nonce, msg + 8, 23, msg, 8) != 31 ||
	    memcmp(msg + 8, ccm_out, sizeof ccm_out) != 0)
		return fail("RFC 3610 packet vector #1: wrong ciphertext or tag");

	memcpy(k, key, sizeof k);
	memcpy(block, pt, sizeof block);
	for (i = 0; i < 100000; i++) {
		if (i % 1000 == 0) {	/* a new key from the chain every 1000 blocks */
			memcpy(k, block, sizeof k);
			if (rijndael_set_key_enc_only(&ctx, k, 128) != 0)
				return 2;
			absorb((const unsigned char *)ctx.ek, 44 * sizeof ctx.ek[0]);
		}
		rijndael_encrypt(&ctx, block, block);
		absorb(block, sizeof block);
	}

	/* DTLS 1.2 with AES-128-CCM-8: 12-octet nonce (L = 3), 13-octet aad */
	for (n = 0; n <= 1100; n++) {
		for (i = 0; i < 13; i++)
			aad[i] = nonce[i] = block[i] ^ (unsigned char)(n + i);
		for (i = 0; i < (int)n; i++)
			msg[i] = (unsigned char)(i * 7 + n);
		memcpy(copy, msg, n);
		if (dtls_ccm_encrypt_message(&ctx, 8, 3, nonce, msg, n, aad, 13) != (long)n + 8)
			return fail("CCM: wrong record length");
		absorb(msg, n + 8);
		if (dtls_ccm_decrypt_message(&ctx, 8, 3, nonce, msg, n + 8, aad, 13) != (long)n ||
		    memcmp(msg, copy, n) != 0)
			return fail("CCM: decryption does not invert encryption");
		dtls_ccm_encrypt_message(&ctx, 8, 3, nonce, msg, n, aad, 13);
		msg[n] ^= 1;	/* a changed tag must be refused */
		if (dtls_ccm_decrypt_message(&ctx, 8, 3, nonce, msg, n + 8, aad, 13) != -1)
			return fail("CCM: a changed tag was accepted");
		if (n > 0) {	/* and so must a changed ciphertext octet */
			dtls_ccm_encrypt_message(&ctx, 8, 3, nonce, copy, n, aad, 13);
			copy[n / 2] ^= 0x80;
			if (dtls_ccm_decrypt_message(&ctx, 8, 3, nonce, copy, n + 8, aad, 13) != -1)
				return fail("CCM: a changed ciphertext was accepted");
		}
	}
	printf("%lx\n", digest);
	return 0;
}
