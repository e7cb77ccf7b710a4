#include "gradreg/distance_transform.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "ops.h"
#include "parallel.h"

namespace gradreg {
namespace cpu {

namespace surface_distance_detail {

// The squared distance transform of `box` (sizes n, C order) in place, where every voxel holds 0 (a site) or
// +inf: lower_envelope along every line of W, then H, then D. Lines are copied out and back, so the envelope
// never reads what it has written; lines without a site are left as they are (all +inf).
inline void transform_box(double* box, const int64_t* n, const double* weight, double* line, double* result,
                          int64_t* site, double* bound) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t volume = n[0] * n[1] * n[2];
  int64_t stride = 1;
  for (int axis = 2; axis >= 0; stride *= n[axis--]) {
    const int64_t length = n[axis], lines = volume / length;
    for (int64_t l = 0; l < lines; ++l) {
      // Line l's first voxel: l enumerates the other two axes in C order.
      double* first = box + (l / stride) * stride * length + l % stride;
      bool any = false;
      for (int64_t i = 0; i < length; ++i) {
        line[i] = first[i * stride];
        any |= line[i] != inf;
      }
      if (!any) continue;
      lower_envelope(line, result, length, weight[axis], site, bound);
      for (int64_t i = 0; i < length; ++i) first[i * stride] = result[i];
    }
  }
}

// Writes out[i] = distance (mm) from points[i] to the nearest site, for the `count` points of one label.
inline void distances_to_sites(double* box, const int64_t* low, const int64_t* n, const double* weight,
                               const int64_t* sites, int64_t site_count, const int64_t* points, int64_t count,
                               double* out, double* line, double* result, int64_t* site, double* bound) {
  const int64_t volume = n[0] * n[1] * n[2];
  std::fill(box, box + volume, std::numeric_limits<double>::infinity());
  auto offset = [&](const int64_t* p) { return ((p[0] - low[0]) * n[1] + (p[1] - low[1])) * n[2] + (p[2] - low[2]); };
  for (int64_t s = 0; s < site_count; ++s) box[offset(sites + 3 * s)] = 0.0;
  transform_box(box, n, weight, line, result, site, bound);
  for (int64_t i = 0; i < count; ++i) out[i] = std::sqrt(box[offset(points + 3 * i)]);
}

}  // namespace surface_distance_detail

void label_surface_distances(const int64_t* points_a, const int64_t* starts_a, const int64_t* points_b,
                             const int64_t* starts_b, const int64_t* labels, const int64_t* boxes, int64_t count,
                             const double* spacing, double* out_ab, double* out_ba, int threads) {
  using namespace surface_distance_detail;
  if (count <= 0) return;
  int64_t largest_box = 1, longest_line = 1;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t* size = boxes + 6 * t + 3;
    largest_box = std::max<int64_t>(largest_box, checked_count({size[0], size[1], size[2]}));
    longest_line = std::max({longest_line, size[0], size[1], size[2]});
  }
  const int team = std::max<int>(1, std::min<int64_t>(threads, count));
  // Scratch for every thread, allocated here: a std::bad_alloc inside the parallel region would abort.
  // Not zero-filled: each label fills its box before use.
  std::unique_ptr<double[]> box_scratch(new double[checked_count({team, largest_box})]);
  std::unique_ptr<double[]> line_scratch(new double[checked_count({team, 3, longest_line + 1})]);
  std::unique_ptr<int64_t[]> site_scratch(new int64_t[checked_count({team, longest_line})]);
  const double weight[3] = {spacing[0] * spacing[0], spacing[1] * spacing[1], spacing[2] * spacing[2]};

#pragma omp parallel num_threads(team)
  {
    const int id = thread_id();
    double* box = box_scratch.get() + size_t(id) * size_t(largest_box);
    double* line = line_scratch.get() + size_t(id) * 3 * size_t(longest_line + 1);
    double* result = line + (longest_line + 1);
    double* bound = result + (longest_line + 1);
    int64_t* site = site_scratch.get() + size_t(id) * size_t(longest_line);
    // Labels differ widely in size: handed out one at a time (each label's distances depend on it alone, so
    // the result is the same whichever thread takes it).
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < count; ++t) {
      const int64_t k = labels[t];
      const int64_t* low = boxes + 6 * t;
      const int64_t* n = low + 3;
      const int64_t a0 = starts_a[k], a1 = starts_a[k + 1], b0 = starts_b[k], b1 = starts_b[k + 1];
      distances_to_sites(box, low, n, weight, points_b + 3 * b0, b1 - b0, points_a + 3 * a0, a1 - a0, out_ab + a0,
                         line, result, site, bound);
      distances_to_sites(box, low, n, weight, points_a + 3 * a0, a1 - a0, points_b + 3 * b0, b1 - b0, out_ba + b0,
                         line, result, site, bound);
    }
  }
}

}  // namespace cpu
}  // namespace gradreg
