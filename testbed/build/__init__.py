"""What guests boot from, built or fetched once and cached by content.

images (the Debian root made with mmdebstrap, packed as an initramfs), kernels (a
kernel name -> Kernel: distro_kernel extracts Debian's, kernel_build builds stock
and patched 6.1), kernel (the Kernel type), cachemodel_plugin (the TCG plugin
compiled against the installed QEMU), sysdeps (host packages), cpio and newc
(initramfs archives).
"""
