# Build and install libphi4 (shared and static), its header and pkg-config file, and the CLI.
#   make            build the release library and CLI
#   make dist       the shipped files in $(DIST): stripped, each with its debug info beside it
#                   as FILE.debug (linked by .gnu_debuglink, so gdb finds it when installed)
#   make install    install under PREFIX (default /usr/local); DESTDIR for staging
PREFIX  ?= /usr/local
LIBDIR  ?= $(PREFIX)/lib
INCDIR  ?= $(PREFIX)/include
BINDIR  ?= $(PREFIX)/bin
CARGO   ?= cargo
CARGO_BUILD ?= $(CARGO) build --release
TARGET_DIR ?= target/release
DIST    ?= dist
AR      ?= ar
RANLIB  ?= ranlib
STRIP   ?= strip
OBJCOPY ?= objcopy
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR   := $(firstword $(subst ., ,$(VERSION)))

.PHONY: all dist install
all:
	$(CARGO_BUILD) -p phi4 -p phi4-cli

# dist/: the artefacts as shipped. The static archive as cargo leaves it also carries the
# objects of llama.cpp's libllama (cargo bundles every static native library of a dependency);
# phi4 never calls them, so they are removed here.
dist: all
	rm -rf $(DIST) && mkdir -p $(DIST)
	cp $(TARGET_DIR)/libphi4.so $(DIST)/libphi4.so.$(VERSION)
	ln -sf libphi4.so.$(VERSION) $(DIST)/libphi4.so.$(MAJOR)
	ln -sf libphi4.so.$(MAJOR) $(DIST)/libphi4.so
	cp $(TARGET_DIR)/libphi4.a $(DIST)/libphi4.a
	cp $(TARGET_DIR)/phi4 $(DIST)/phi4
	# (Every libllama.a cargo has built here: another profile leaves another build directory.)
	for a in $(TARGET_DIR)/build/llama-cpp-sys-2-*/out/lib/libllama.a; do $(AR) t $$a; done 2>/dev/null | sort -u > $(DIST)/.llama-members
	# (binutils' LLVM plugin complains about the Rust bitcode sections it cannot read: noise.
	# A strip that failed is caught by tests/dist.rs.)
	{ xargs -a $(DIST)/.llama-members $(AR) d $(DIST)/libphi4.a && $(RANLIB) $(DIST)/libphi4.a; } 2>&1 | grep -v '^bfd plugin' >&2 || true
	rm $(DIST)/.llama-members
	for f in $(DIST)/libphi4.so.$(VERSION) $(DIST)/phi4; do \
	  $(OBJCOPY) --only-keep-debug $$f $$f.debug && $(STRIP) $$f && \
	  (cd $(DIST) && $(OBJCOPY) --add-gnu-debuglink=$$(basename $$f).debug $$(basename $$f)) || exit 1; done
	$(STRIP) --strip-debug $(DIST)/libphi4.a 2>&1 | grep -v '^bfd plugin' >&2 || true
	cp include/phi4.h $(DIST)/

install: dist
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCDIR)
	install -m 644 include/phi4.h $(DESTDIR)$(INCDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|; s|@LIBDIR@|$(LIBDIR)|; s|@INCDIR@|$(INCDIR)|; s|@VERSION@|$(VERSION)|' \
	    phi4.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/phi4.pc
	install -m 755 $(DIST)/libphi4.so.$(VERSION) $(DESTDIR)$(LIBDIR)/
	install -m 644 $(DIST)/libphi4.so.$(VERSION).debug $(DESTDIR)$(LIBDIR)/
	ln -sf libphi4.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libphi4.so.$(MAJOR)
	ln -sf libphi4.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libphi4.so
	install -m 644 $(DIST)/libphi4.a $(DESTDIR)$(LIBDIR)/
	install -m 755 $(DIST)/phi4 $(DESTDIR)$(BINDIR)/
	install -m 644 $(DIST)/phi4.debug $(DESTDIR)$(BINDIR)/
