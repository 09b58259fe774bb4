{"algorithm":"ed25519","key_id":"04a02fa7cbbf3291","signature":"i1k0LWiHcZJv0NlVBR3CPVP6ux/P7khTNv8pHItlwAz7gaftae34nE/n8eigL5Jrong/QQF6Qdr/vx1cfzqPBQ=="}
