"""The wire between device and cloud: the reply frame, the upload, the checksum.

It imports numpy and the standard library only, and neither the cloud nor the device runtime,
so both sides (and any third party) can speak it.
"""
