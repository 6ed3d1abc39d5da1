#include <phi4.h>
