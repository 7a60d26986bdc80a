# cython: language_level=3
"""Declarations of the TurboJPEG API (libjpeg-turbo >= 2.0; only TJ2 calls that 3.x keeps)."""

cdef extern from "turbojpeg.h" nogil:
    ctypedef void* tjhandle

    ctypedef struct tjscalingfactor:
        int num
        int denom

    enum TJPF:
        TJPF_RGB
        TJPF_BGR
        TJPF_RGBX
        TJPF_BGRX
        TJPF_XBGR
        TJPF_XRGB
        TJPF_GRAY
        TJPF_RGBA
        TJPF_BGRA
        TJPF_ABGR
        TJPF_ARGB
        TJPF_CMYK

    enum TJCS:
        TJCS_RGB
        TJCS_YCbCr
        TJCS_GRAY
        TJCS_CMYK
        TJCS_YCCK

    enum TJSAMP:
        TJSAMP_444
        TJSAMP_422
        TJSAMP_420
        TJSAMP_GRAY
        TJSAMP_440
        TJSAMP_411

    enum TJERR:
        TJERR_WARNING
        TJERR_FATAL

    int TJFLAG_FASTUPSAMPLE
    int TJFLAG_FASTDCT
    int TJFLAG_ACCURATEDCT
    int TJFLAG_STOPONWARNING
    int TJFLAG_LIMITSCANS

    tjhandle tjInitDecompress()
    int tjDestroy(tjhandle handle)
    int tjDecompressHeader3(tjhandle handle, const unsigned char* jpegBuf,
                            unsigned long jpegSize, int* width, int* height,
                            int* jpegSubsamp, int* jpegColorspace)
    tjscalingfactor* tjGetScalingFactors(int* numScalingFactors)
    int tjDecompress2(tjhandle handle, const unsigned char* jpegBuf,
                      unsigned long jpegSize, unsigned char* dstBuf, int width,
                      int pitch, int height, int pixelFormat, int flags)
    char* tjGetErrorStr2(tjhandle handle)
    int tjGetErrorCode(tjhandle handle)
